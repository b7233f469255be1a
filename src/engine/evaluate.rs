//! The `evaluate` measurement: task metrics, fidelity to a baseline, size, latency and memory of one
//! model on one dataset, all in ONNX Runtime on CPU.
use crate::domain::report::{LatencyMetrics, MemoryMetrics, Metrics, SizeMetrics};
use crate::domain::spec::EvaluateOptions;
use crate::domain::task::TaskKind;
use crate::engine::dataset::{bind, Dataset, Tensor};
use crate::engine::memory::PeakSampler;
use crate::engine::onnx::{params, summarize, LoadedModel};
use crate::engine::runtime::{self, OutputValue, Runtime};
use crate::engine::task::{self, Reading};
use crate::engine::{latency, EngineError, Progress, Result, SubProgress};

/// Outputs and figures of a reference model that later evaluations compare against.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub outputs: Vec<OutputValue>,
    pub size_bytes: u64,
    pub p50_batch_1_ms: f64,
    pub p50_batch_n_ms: Option<f64>,
}

/// The metrics of one evaluation and the raw outputs (for comparing later models with this one).
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub metrics: Metrics,
    pub outputs: Vec<OutputValue>,
    pub notes: Vec<String>,
}

impl Evaluation {
    /// Makes this evaluation the reference for later ones.
    pub fn as_baseline(&self) -> Baseline {
        Baseline {
            outputs: self.outputs.clone(),
            size_bytes: self.metrics.size.bytes,
            p50_batch_1_ms: self.metrics.latency.batch_1.p50_ms,
            p50_batch_n_ms: self.metrics.latency.batch_n.as_ref().map(|s| s.p50_ms),
        }
    }
}

/// Evaluates `model` on `data`. Without a `baseline`, the model is compared with itself.
pub fn evaluate(
    rt: &Runtime,
    model: &LoadedModel,
    data: &Dataset,
    opts: &EvaluateOptions,
    baseline: Option<&Baseline>,
    progress: &dyn Progress,
) -> Result<Evaluation> {
    let summary = summarize(&model.proto);
    let binding = bind(&summary, &data.summary)?;
    let mut notes = Vec::new();
    let samples = opts
        .max_samples
        .map_or(binding.samples, |m| m.min(binding.samples)) as usize;

    // A fixed leading dimension pins the batch size (common in exported vision models).
    let fixed_batch = summary.fixed_batch();
    let batch = fixed_batch.unwrap_or(opts.batch_size as usize).max(1);
    if let Some(n) = fixed_batch {
        notes.push(format!(
            "the model's batch dimension is fixed to {n}; evaluation and latency use batch {n}"
        ));
    }
    let classifier = choose_classifier(
        &summary.outputs,
        opts.output.as_deref(),
        binding.labels.is_some(),
    )?;

    let sampler = PeakSampler::start();
    let mut session = rt.session(&model.bytes, opts.threads as usize)?;
    let load_growth = sampler.growth_now();

    // Accuracy pass over whole batches; a fixed batch size drops the remainder.
    let usable = if fixed_batch.is_some() {
        samples / batch * batch
    } else {
        samples
    };
    if usable == 0 {
        return Err(EngineError::InvalidDataset {
            tensor: binding.inputs[0].1.clone(),
            problem: format!(
                "has {samples} samples, fewer than the model's fixed batch size {batch}"
            ),
        });
    }
    let mut batches: Vec<(usize, Vec<OutputValue>)> = Vec::new();
    let mut start = 0;
    while start < usable {
        let end = (start + batch).min(usable);
        let batch_out = runtime::run(
            &mut session,
            runtime::feeds(data, &binding.inputs, start..end)?,
        )?;
        batches.push((end - start, batch_out));
        start = end;
        progress.update(0.5 * start as f64 / usable as f64)?;
    }

    let time_major = time_major_outputs(&batches);
    let mut outputs: Vec<OutputValue> = Vec::new();
    for (rows, mut batch_out) in batches {
        for o in &mut batch_out {
            if time_major.contains(&o.name) {
                to_batch_major(o, rows);
            }
        }
        append(&mut outputs, batch_out);
    }
    for name in &time_major {
        notes.push(format!(
            "output `{name}` is time-major ([T, N, C]: its axis 1 follows the batch); it is read as [N, T, C]"
        ));
    }

    let warmup = opts.warmup_runs as usize;
    let runs = opts.latency_runs as usize;
    let b1 = fixed_batch.unwrap_or(1);
    let batch_1 = latency::measure(
        &mut session,
        data,
        &binding.inputs,
        b1,
        warmup,
        runs,
        &SubProgress {
            parent: progress,
            start: 0.5,
            span: 0.2,
        },
    )?;
    let batch_n = if fixed_batch.is_none() && batch > 1 {
        Some(latency::measure(
            &mut session,
            data,
            &binding.inputs,
            batch,
            warmup,
            runs,
            &SubProgress {
                parent: progress,
                start: 0.7,
                span: 0.3,
            },
        )?)
    } else {
        None
    };
    drop(session);
    let peak_growth = sampler.finish();

    let labels = binding.labels.as_ref().and_then(|l| data.tensor(l));
    let readings = readings(&outputs, classifier.as_deref(), labels, opts, model)?;
    if let Some((out, r)) = classifier
        .as_deref()
        .and_then(|c| readings.iter().find(|(o, _)| o == c))
    {
        if opts.task.is_none() && r.kind != TaskKind::Classification {
            notes.push(format!(
                "output `{out}` is scored as {} (from its shape{}); name `task` in the spec to change that",
                r.kind.name(),
                if labels.is_some() { " and the labels'" } else { "" }
            ));
        }
    }
    let task = match (&labels, &classifier) {
        (Some(labels), Some(name)) => {
            let out = outputs
                .iter()
                .find(|o| &o.name == name)
                .expect("the scored output exists");
            let r = &readings.iter().find(|(o, _)| o == name).expect("read").1;
            Some(task::task_metrics(out, r, labels, usable)?)
        }
        _ => None,
    };
    let mut fidelity = match baseline {
        Some(b) => compare(&b.outputs, &outputs, &readings),
        None => compare(&outputs, &outputs, &readings),
    };
    // The scored output's fidelity comes first: budgets without labels read it.
    if let Some(c) = &classifier {
        if let Some(i) = fidelity.iter().position(|f| &f.output == c) {
            let f = fidelity.remove(i);
            fidelity.insert(0, f);
        }
    }

    let graph = model
        .proto
        .graph
        .as_ref()
        .expect("loaded models have a graph");
    let (parameters, nonzero) = params::parameter_counts(graph);
    let bytes = model.bytes.len() as u64;
    let zstd_bytes = zstd_size(&model.bytes);
    let base_bytes = baseline.map_or(bytes, |b| b.size_bytes);
    let speedup = |base: Option<f64>, now: f64| base.filter(|_| now > 0.0).map(|b| b / now);

    let metrics = Metrics {
        samples: usable as u64,
        task,
        fidelity,
        size: SizeMetrics {
            bytes,
            zstd_bytes,
            parameters,
            nonzero_parameters: nonzero,
            sparsity: if parameters > 0 {
                1.0 - nonzero as f64 / parameters as f64
            } else {
                0.0
            },
            compression_ratio: base_bytes as f64 / bytes.max(1) as f64,
        },
        latency: LatencyMetrics {
            runtime: format!("onnxruntime {} (CPU)", rt.version),
            intra_op_threads: opts.threads as u64,
            speedup_batch_1: speedup(
                Some(baseline.map_or(batch_1.p50_ms, |b| b.p50_batch_1_ms)),
                batch_1.p50_ms,
            )
            .unwrap_or(1.0),
            speedup_batch_n: batch_n.as_ref().and_then(|s| {
                speedup(
                    baseline.map_or(Some(s.p50_ms), |b| b.p50_batch_n_ms),
                    s.p50_ms,
                )
            }),
            batch_1,
            batch_n,
        },
        memory: MemoryMetrics {
            peak_rss_growth_bytes: peak_growth,
            load_rss_growth_bytes: load_growth,
            scope: crate::domain::report::MemoryScope::Process,
        },
    };
    Ok(Evaluation {
        metrics,
        outputs,
        notes,
    })
}

/// Picks the output that holds class scores: the named one, the only one, or the only float
/// output of rank >= 2. Fails only when labels exist and the choice is ambiguous.
pub fn choose_classifier(
    outputs: &[crate::domain::model::TensorSignature],
    named: Option<&str>,
    has_labels: bool,
) -> Result<Option<String>> {
    if let Some(name) = named {
        if outputs.iter().any(|o| o.name == name) {
            return Ok(Some(name.to_string()));
        }
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        return Err(EngineError::InvalidOption {
            option: "output".into(),
            problem: format!(
                "the model has no output `{name}` (it has: {})",
                names.join(", ")
            ),
        });
    }
    if outputs.len() == 1 {
        return Ok(Some(outputs[0].name.clone()));
    }
    let scores: Vec<&str> = outputs
        .iter()
        .filter(|o| o.dtype.starts_with("float") && o.shape.len() >= 2)
        .map(|o| o.name.as_str())
        .collect();
    match scores.as_slice() {
        [one] => Ok(Some(one.to_string())),
        _ if !has_labels => Ok(None),
        _ => Err(EngineError::InvalidOption {
            option: "output".into(),
            problem: format!(
                "cannot tell which output holds the class scores among: {}; name it in the evaluate stage's `output`",
                outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// The outputs that are time-major `[T, N, C]` (as recurrent CTC models export them for
/// PyTorch's `CTCLoss`): rank 3 with axis 1 following the batch and axis 0 not, in at least one
/// batch of `(rows, outputs)` and never contradicted by another. An output whose axes 0 and 1 both
/// equal the batch in every batch is read as batch-major.
pub fn time_major_outputs(batches: &[(usize, Vec<OutputValue>)]) -> Vec<String> {
    let Some((_, first)) = batches.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let mut seen = false;
            for (rows, outs) in batches {
                let Some([t, n, _]) = outs.get(*i).map(|o| &o.shape[..]) else {
                    return false;
                };
                if *n != *rows {
                    return false;
                }
                seen |= *t != *rows;
            }
            seen
        })
        .map(|(_, o)| o.name.clone())
        .collect()
}

/// Turns a time-major `[T, N, C]` output of `rows` rows into `[N, T, C]`, so that axis 0 holds
/// samples like every other output.
pub fn to_batch_major(out: &mut OutputValue, rows: usize) {
    let [t, n, c] = out.shape[..] else {
        return;
    };
    debug_assert_eq!(n, rows);
    if n > 1 {
        let mut moved = Vec::with_capacity(out.values.len());
        for s in 0..n {
            for step in 0..t {
                let at = (step * n + s) * c;
                moved.extend_from_slice(&out.values[at..at + c]);
            }
        }
        out.values = moved;
    }
    out.shape = vec![n, t, c];
}

fn append(acc: &mut Vec<OutputValue>, batch: Vec<OutputValue>) {
    if acc.is_empty() {
        *acc = batch;
        return;
    }
    for (a, b) in acc.iter_mut().zip(batch) {
        a.values.extend_from_slice(&b.values);
        if let (Some(a0), Some(b0)) = (a.shape.first_mut(), b.shape.first()) {
            *a0 += b0;
        }
    }
}

/// How every output is read: the scored one as the spec names or its shapes say, the others
/// from their shapes alone.
fn readings(
    outputs: &[OutputValue],
    scored: Option<&str>,
    labels: Option<&Tensor>,
    opts: &EvaluateOptions,
    model: &LoadedModel,
) -> Result<Vec<(String, Reading)>> {
    outputs
        .iter()
        .map(|o| {
            let mine = Some(o.name.as_str()) == scored;
            let kind = if mine {
                task::infer(&o.name, &o.shape, opts.task, labels)?
            } else {
                task::infer(&o.name, &o.shape, None, None)?
            };
            let mut r = Reading::new(kind);
            if mine {
                r.threshold = opts.threshold.unwrap_or(0.5);
                r.blank = opts.blank.unwrap_or(0) as usize;
                r.characters = opts.characters.clone().or_else(|| {
                    let mut chars = model_characters(&model.proto)?;
                    // PaddleOCR leaves the space class (the last) out of the metadata list.
                    if chars.len() + 2 == *o.shape.last()? {
                        chars.push(" ".into());
                    }
                    Some(chars)
                });
            }
            Ok((o.name.clone(), r))
        })
        .collect()
}

/// The character list PaddleOCR writes into its recognisers' metadata (`character`, one per line).
fn model_characters(proto: &crate::engine::onnx::proto::ModelProto) -> Option<Vec<String>> {
    let text = proto
        .metadata_props
        .iter()
        .find(|p| p.key.as_deref() == Some("character"))?
        .value
        .clone()?;
    Some(text.split('\n').map(str::to_string).collect())
}

fn compare(
    base: &[OutputValue],
    now: &[OutputValue],
    readings: &[(String, Reading)],
) -> Vec<crate::domain::report::OutputFidelity> {
    base.iter()
        .filter_map(|b| {
            let c = now.iter().find(|c| c.name == b.name)?;
            let r = readings.iter().find(|(o, _)| o == &b.name)?;
            Some(task::fidelity(b, c, &r.1))
        })
        .collect()
}

/// Bytes after zstd at level 3: what zeros and repeated weights save in transfer and storage.
pub fn zstd_size(bytes: &[u8]) -> u64 {
    zstd::bulk::compress(bytes, 3).map_or(bytes.len() as u64, |c| c.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(shape: &[usize]) -> OutputValue {
        OutputValue {
            name: "y".into(),
            shape: shape.to_vec(),
            values: (0..shape.iter().product::<usize>())
                .map(|v| v as f32)
                .collect(),
        }
    }

    #[test]
    fn time_major_outputs_need_one_telling_batch_and_no_contradiction() {
        // [T=4, N=3, C=2] then a remainder batch where T equals the rows.
        let tm = vec![(3, vec![out(&[4, 3, 2])]), (4, vec![out(&[4, 4, 2])])];
        assert_eq!(time_major_outputs(&tm), vec!["y".to_string()]);
        // Every batch ambiguous: batch-major.
        assert!(time_major_outputs(&[(4, vec![out(&[4, 4, 2])])]).is_empty());
        // Batch-major [N, T, C]; the second batch's axis 1 happens to equal its rows.
        let bm = vec![(3, vec![out(&[3, 5, 2])]), (5, vec![out(&[5, 5, 2])])];
        assert!(time_major_outputs(&bm).is_empty());
        // Axis 1 follows the batch once but not in another batch: not time-major.
        let mixed = vec![(3, vec![out(&[4, 3, 2])]), (2, vec![out(&[2, 4, 2])])];
        assert!(time_major_outputs(&mixed).is_empty());
        // Other ranks are never moved.
        assert!(time_major_outputs(&[(3, vec![out(&[4, 3])])]).is_empty());
    }

    #[test]
    fn to_batch_major_transposes_time_and_batch() {
        let mut o = out(&[2, 3, 2]);
        // values[t][n][c] = t*6 + n*2 + c
        to_batch_major(&mut o, 3);
        assert_eq!(o.shape, vec![3, 2, 2]);
        assert_eq!(
            o.values,
            vec![0., 1., 6., 7., 2., 3., 8., 9., 4., 5., 10., 11.]
        );
        let mut one = out(&[5, 1, 2]);
        to_batch_major(&mut one, 1);
        assert_eq!((one.shape.clone(), one.values.len()), (vec![1, 5, 2], 10));
        assert_eq!(one.values, out(&[5, 1, 2]).values);
    }
}
