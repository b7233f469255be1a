//! Task metrics (top-k accuracy, macro-F1) and the vector similarities fidelity uses.
use std::collections::BTreeMap;

/// Index of the largest value; the first one on ties, as numpy's argmax.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Whether `label` is among the `k` largest scores (ties broken toward lower indices).
pub fn in_top_k(row: &[f32], label: usize, k: usize) -> bool {
    let Some(&target) = row.get(label) else {
        return false;
    };
    let better = row
        .iter()
        .enumerate()
        .filter(|(i, v)| **v > target || (**v == target && *i < label))
        .count();
    better < k
}

/// Macro-averaged F1 over every class seen in labels or predictions (scikit-learn's `average="macro"`).
pub fn macro_f1(predicted: &[i64], labels: &[i64]) -> f64 {
    let mut counts: BTreeMap<i64, (u64, u64, u64)> = BTreeMap::new(); // (tp, fp, fn)
    for (&p, &l) in predicted.iter().zip(labels) {
        if p == l {
            counts.entry(l).or_default().0 += 1;
        } else {
            counts.entry(p).or_default().1 += 1;
            counts.entry(l).or_default().2 += 1;
        }
    }
    if counts.is_empty() {
        return 0.0;
    }
    let sum: f64 = counts
        .values()
        .map(|&(tp, fp, fn_)| {
            let denom = 2 * tp + fp + fn_;
            if denom == 0 {
                0.0
            } else {
                2.0 * tp as f64 / denom as f64
            }
        })
        .sum();
    sum / counts.len() as f64
}

/// Cosine similarity; two all-zero vectors are identical (1), one zero vector against another is 0.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 && nb == 0.0 {
        1.0
    } else if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_matches_scikit_learn_on_a_hand_checked_case() {
        // sklearn.metrics.f1_score([0,0,1,2], [0,1,1,1], average="macro") == (2/3 + 1/2 + 0) / 3
        assert!((macro_f1(&[0, 1, 1, 1], &[0, 0, 1, 2]) - 7.0 / 18.0).abs() < 1e-12);
    }

    #[test]
    fn top_k_counts_ties_toward_the_lower_index() {
        assert!(in_top_k(&[0.5, 0.5, 0.1], 0, 1));
        assert!(!in_top_k(&[0.5, 0.5, 0.1], 1, 1));
        assert!(in_top_k(&[0.5, 0.5, 0.1], 1, 2));
    }

    #[test]
    fn argmax_takes_the_first_maximum_like_numpy() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
