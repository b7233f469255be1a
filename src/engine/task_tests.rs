//! Unit tests of task reading and scoring.
use super::*;

fn value(shape: &[usize], values: Vec<f32>) -> OutputValue {
    OutputValue {
        name: "y".into(),
        shape: shape.to_vec(),
        values,
    }
}

fn labels(shape: &[usize], v: Vec<i64>) -> Tensor {
    Tensor {
        name: "labels".into(),
        shape: shape.to_vec(),
        data: TensorData::I64(v),
    }
}

#[test]
fn mean_iou_averages_over_classes_in_labels_or_predictions_and_skips_ignored_pixels() {
    // One sample, 2 classes, 1x4 pixels; class scores put pixel 0,1 in class 1, pixel 2,3 in class 0.
    let out = value(&[1, 2, 1, 4], vec![0., 0., 1., 1., 1., 1., 0., 0.]);
    let l = labels(&[1, 1, 4], vec![1, 0, 0, 255]);
    let m = task_metrics(&out, &Reading::new(TaskKind::Segmentation), &l, 1).unwrap();
    let s = m.segmentation.unwrap();
    // Pixels 0..3 scored: pred [1,1,0], truth [1,0,0]: class 0 IoU 1/2, class 1 IoU 1/2.
    assert_eq!(s.pixels, 3);
    assert!((s.pixel_accuracy - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(s.per_class_iou, vec![Some(0.5), Some(0.5)]);
    assert!((s.mean_dice - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(m.score, 0.5);
}

#[test]
fn a_probability_map_is_thresholded_and_a_logit_map_goes_through_a_sigmoid() {
    let mut r = Reading::new(TaskKind::Segmentation);
    r.threshold = 0.6;
    let probs = value(&[1, 1, 1, 3], vec![0.2, 0.59, 0.61]);
    assert_eq!(predictions(&probs, &r), vec![0, 0, 1]);
    let logits = value(&[1, 1, 1, 3], vec![-3.0, 0.3, 0.5]);
    // sigmoid(0.3) = 0.574, sigmoid(0.5) = 0.622
    assert_eq!(predictions(&logits, &r), vec![0, 0, 1]);
}

#[test]
fn ctc_decoding_merges_repeats_and_drops_blanks() {
    // 5 steps over 3 classes: 1 1 0 1 2 -> [1, 1, 2]
    let steps = [1, 1, 0, 1, 2];
    let mut v = vec![0.0f32; 15];
    for (t, &k) in steps.iter().enumerate() {
        v[t * 3 + k] = 1.0;
    }
    let out = value(&[1, 5, 3], v);
    assert_eq!(ctc_decode(&out, 0), vec![vec![1, 1, 2]]);
    let mut r = Reading::new(TaskKind::Ctc);
    r.characters = Some(vec!["a".into(), "b".into()]);
    let l = Tensor {
        name: "labels".into(),
        shape: vec![1],
        data: TensorData::Str(vec!["aab".into()]),
    };
    let m = task_metrics(&out, &r, &l, 1).unwrap();
    assert_eq!(m.score, 1.0);
    let l = Tensor {
        data: TensorData::Str(vec!["abb".into()]),
        ..l
    };
    let m = task_metrics(&out, &r, &l, 1).unwrap();
    assert_eq!(m.score, 0.0);
    assert!((m.sequence.unwrap().character_error_rate.unwrap() - 1.0 / 3.0).abs() < 1e-12);
}

#[test]
fn levenshtein_counts_single_element_edits() {
    assert_eq!(levenshtein(b"kitten", b"sitting"), 3);
    assert_eq!(levenshtein::<u8>(b"", b"abc"), 3);
}

#[test]
fn the_task_follows_the_labels_then_the_output_shape() {
    let seg = labels(&[2, 4, 4], vec![0; 32]);
    assert_eq!(
        infer("y", &[2, 3, 4, 4], None, Some(&seg)).unwrap(),
        TaskKind::Segmentation
    );
    assert_eq!(
        infer("y", &[2, 3, 4, 4], None, None).unwrap(),
        TaskKind::Segmentation
    );
    assert_eq!(
        infer("y", &[2, 3, 1, 1], None, None).unwrap(),
        TaskKind::Classification
    );
    assert_eq!(
        infer("y", &[2, 7, 5], None, None).unwrap(),
        TaskKind::Sequence
    );
    assert!(infer("y", &[2, 10], Some(TaskKind::Segmentation), None).is_err());
    let per_sample = labels(&[2], vec![0, 1]);
    assert_eq!(
        infer("y", &[2, 7, 5], None, Some(&per_sample)).unwrap(),
        TaskKind::Classification
    );
}

#[test]
fn a_model_compared_with_itself_is_perfectly_faithful() {
    let out = value(&[2, 3], vec![0.1, 0.7, 0.2, 0.9, 0.05, 0.05]);
    let f = fidelity(&out, &out, &Reading::new(TaskKind::Classification));
    assert_eq!((f.top1_agreement, f.max_abs_error), (1.0, 0.0));
    assert!((f.cosine_mean - 1.0).abs() < 1e-12);
}

#[test]
fn segmentation_fidelity_is_the_mask_iou_between_the_two_models() {
    let a = value(&[1, 1, 1, 4], vec![0.9, 0.9, 0.1, 0.1]);
    let b = value(&[1, 1, 1, 4], vec![0.9, 0.1, 0.1, 0.1]);
    let f = fidelity(&a, &b, &Reading::new(TaskKind::Segmentation));
    // background: 2 agree of union 3 -> 2/3; foreground: 1 of 2 -> 1/2
    assert!((f.mask_iou.unwrap() - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12);
    assert_eq!(f.top1_agreement, 0.75);
}

#[test]
fn ctc_fidelity_is_the_share_of_samples_that_decode_the_same() {
    // One-hot steps over 3 classes (0 = blank); two samples of 4 steps each.
    let steps = |classes: &[usize]| -> Vec<f32> {
        classes
            .iter()
            .flat_map(|&k| (0..3).map(move |c| if c == k { 1.0 } else { 0.0 }))
            .collect()
    };
    let base = value(
        &[2, 4, 3],
        [steps(&[1, 0, 2, 0]), steps(&[1, 1, 0, 2])].concat(),
    );
    // Sample 0: the spike of class 2 moves by a step (decodes "1 2" still); sample 1 loses its 2.
    let now = value(
        &[2, 4, 3],
        [steps(&[1, 0, 0, 2]), steps(&[1, 1, 0, 0])].concat(),
    );
    let f = fidelity(&base, &now, &Reading::new(TaskKind::Ctc));
    assert_eq!(f.sequence_agreement, Some(0.5));
    assert_eq!(f.top1_agreement, 5.0 / 8.0);
    assert_eq!(f.agreement(), 0.5);
    // Read per position, the same outputs keep no decoded-sequence figure.
    let f = fidelity(&base, &now, &Reading::new(TaskKind::Sequence));
    assert_eq!((f.sequence_agreement, f.agreement()), (None, 5.0 / 8.0));
}

#[test]
fn a_dequantized_probability_map_that_overshoots_one_by_rounding_is_still_probabilities() {
    // An int8 model's DequantizeLinear after the Sigmoid: 255 x scale = 1.0000001, 0 x scale = -0.
    let float = value(&[1, 1, 1, 4], vec![0.99, 0.2, 0.7, 0.1]);
    let int8 = value(&[1, 1, 1, 4], vec![1.000_000_1, 0.2, 0.7, -1e-7]);
    let r = Reading::new(TaskKind::Segmentation);
    assert_eq!(predictions(&int8, &r), vec![1, 0, 1, 0]);
    assert_eq!(fidelity(&float, &int8, &r).mask_iou, Some(1.0));
    // Logits clearly outside [0, 1] still go through the sigmoid: -0.5 -> 0.38, 0.2 -> 0.55.
    let logits = value(&[1, 1, 1, 2], vec![-0.5, 0.2]);
    assert_eq!(predictions(&logits, &r), vec![0, 1]);
}
