//! Calibration rows: the spec's calibration dataset, or a seeded split of the job's dataset
//! that is then left out of every evaluation.
use crate::domain::report::CalibrationInfo;
use crate::domain::spec::{JobSpec, Stage};
use crate::engine::dataset::Dataset;
use crate::engine::onnx::LoadedModel;
use crate::engine::{EngineError, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Splits off calibration rows when a stage needs them and no calibration dataset was given:
/// a seeded random sample, removed from the evaluation set so no number is measured on them.
/// Returns (evaluation rows, calibration rows, what the report says about them).
pub(super) fn split(
    spec: &JobSpec,
    model: &LoadedModel,
    data: &Dataset,
    given: Option<Dataset>,
) -> Result<(Dataset, Option<Dataset>, Option<CalibrationInfo>)> {
    let wanted = spec
        .pipeline
        .iter()
        .filter_map(|s| match s {
            Stage::Quantize(q)
                if super::quantize::needs_calibration(q, model)
                    || given.is_some() && super::quantize::auto_compares(q, model) =>
            {
                Some(q.calibration.samples as usize)
            }
            _ => None,
        })
        .max();
    let Some(wanted) = wanted else {
        return Ok((data.clone(), given, None));
    };
    if let Some(c) = given {
        let info = CalibrationInfo {
            source: "calibration_dataset".into(),
            samples: c.summary.samples.min(wanted as u64),
            dataset_rows: vec![],
        };
        return Ok((data.clone(), Some(c), Some(info)));
    }
    let total = data.summary.samples as usize;
    if total < 2 {
        return Err(EngineError::InvalidDataset {
            tensor: "(all)".into(),
            problem: "one sample cannot both calibrate and evaluate".into(),
        });
    }
    // Keep at least half of the dataset for evaluation.
    let n = wanted.min(total / 2).max(1);
    let mut rows: Vec<usize> = (0..total).collect();
    rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(spec.seed));
    let (calib, rest) = rows.split_at(n);
    let mut calib = calib.to_vec();
    let mut rest = rest.to_vec();
    calib.sort_unstable();
    rest.sort_unstable();
    let info = CalibrationInfo {
        source: "split_of_dataset".into(),
        samples: n as u64,
        dataset_rows: calib.iter().map(|&r| r as u64).collect(),
    };
    Ok((data.select(&rest), Some(data.select(&calib)), Some(info)))
}
