//! The report as a plain-text table for job logs and the command line.
use crate::domain::report::{primary_fidelity, Metrics, Report};
use std::fmt::Write;

fn row(out: &mut String, label: &str, m: &Metrics) {
    let acc = m
        .task
        .as_ref()
        .map_or("-".into(), |t| format!("{:.4}", t.score));
    let f1 = m
        .task
        .as_ref()
        .and_then(|t| t.macro_f1)
        .map_or("-".into(), |v| format!("{v:.4}"));
    let agree = primary_fidelity(m).map_or("-".into(), |f| format!("{:.4}", f.agreement()));
    let cos = primary_fidelity(m).map_or("-".into(), |f| format!("{:.5}", f.cosine_mean));
    let bn = m
        .latency
        .batch_n
        .as_ref()
        .map_or("-".into(), |s| format!("{:.3}", s.p50_ms));
    let _ = writeln!(
        out,
        "{label:<14} {acc:>8} {f1:>8} {agree:>8} {cos:>9} {:>11} {:>11} {:>9.3} {:>9.3} {bn:>10} {:>8.2} {:>9.1}",
        m.size.bytes,
        m.size.zstd_bytes,
        m.latency.batch_1.p50_ms,
        m.latency.batch_1.p99_ms,
        m.latency.speedup_batch_1,
        m.memory.peak_rss_growth_bytes as f64 / (1024.0 * 1024.0),
    );
}

fn header(out: &mut String) {
    let _ = writeln!(
        out,
        "{:<14} {:>8} {:>8} {:>8} {:>9} {:>11} {:>11} {:>9} {:>9} {:>10} {:>8} {:>9}",
        "model",
        "score",
        "macroF1",
        "agree",
        "cosine",
        "bytes",
        "zstd",
        "p50@1 ms",
        "p99@1 ms",
        "p50@N ms",
        "speedup",
        "peak MiB"
    );
}

/// One table: baseline, each stage, and the verdicts.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    header(&mut out);
    row(&mut out, "baseline", &report.baseline);
    for s in &report.stages {
        row(&mut out, &format!("{}:{}", s.index, s.stage), &s.metrics);
    }
    let l = &report.final_metrics.latency;
    let _ = writeln!(
        out,
        "latency: {}, {} intra-op thread(s), {} timed runs; batch N = {}",
        l.runtime,
        l.intra_op_threads,
        l.batch_1.runs,
        l.batch_n
            .as_ref()
            .map_or("-".into(), |s| s.batch_size.to_string())
    );
    for s in report.stages.iter().filter(|s| !s.layers.is_empty()) {
        let _ = writeln!(out, "stage {} ({}) layers:", s.index, s.stage);
        let _ = writeln!(
            out,
            "  {:<40} {:<8} {:<8} {:>11}  why",
            "layer", "op", "precision", "sensitivity"
        );
        for l in &s.layers {
            let sens = l.sensitivity.map_or("-".into(), |v| format!("{v:+.4}"));
            let _ = writeln!(
                out,
                "  {:<40} {:<8} {:<8} {sens:>11}  {}",
                l.node, l.op, l.precision, l.reason
            );
        }
    }
    for s in &report.stages {
        let Some(p) = &s.pruning else { continue };
        let _ = writeln!(
            out,
            "stage {} (prune, {}): {:.1}% of {} parameters gone, {} -> {} bytes (zstd {} -> {}), patterns {}",
            s.index,
            p.method,
            p.sparsity * 100.0,
            p.parameters_before,
            p.bytes_before,
            p.bytes_after,
            p.zstd_bytes_before,
            p.zstd_bytes_after,
            if p.verified { "verified" } else { "NOT verified" }
        );
        for l in &p.layers {
            let _ = writeln!(
                out,
                "  {:<40} {:<9} {:<22} {:>10} -> {:>10} non-zero",
                l.node, l.op, l.pattern, l.parameters_before, l.nonzero_after
            );
        }
    }
    for v in &report.verdicts {
        let _ = writeln!(
            out,
            "[{}] {}: {}",
            if v.passed { "PASS" } else { "FAIL" },
            v.constraint,
            v.detail
        );
    }
    out
}

/// A table for a single evaluation (the `shrink eval` command).
pub fn render_metrics(m: &Metrics) -> String {
    let mut out = String::new();
    header(&mut out);
    row(&mut out, "model", m);
    if let Some(t) = &m.task {
        let _ = writeln!(
            out,
            "task: {} on output `{}`, {} samples, {} classes, {} {:.6}, top-1 {:.6}, top-5 {}, macro-F1 {}",
            t.task.name(),
            t.output,
            t.samples,
            t.classes,
            t.metric,
            t.score,
            t.top1_accuracy,
            t.top5_accuracy.map_or("-".into(), |v| format!("{v:.6}")),
            t.macro_f1.map_or("-".into(), |v| format!("{v:.6}")),
        );
        if let Some(s) = &t.segmentation {
            let per: Vec<String> = s
                .per_class_iou
                .iter()
                .enumerate()
                .filter_map(|(c, v)| v.map(|v| format!("{c}:{v:.4}")))
                .collect();
            let _ = writeln!(
                out,
                "segmentation: {} pixels, pixel accuracy {:.6}, mean IoU {:.6}, mean Dice {:.6}, IoU per class {}",
                s.pixels,
                s.pixel_accuracy,
                s.mean_iou,
                s.mean_dice,
                per.join(" ")
            );
        }
        if let Some(q) = &t.sequence {
            if let (Some(acc), Some(cer)) = (q.sequence_accuracy, q.character_error_rate) {
                let _ = writeln!(
                    out,
                    "ctc: sequence accuracy {acc:.6}, character error rate {cer:.6}"
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "size: {} bytes, {} parameters ({} non-zero, sparsity {:.4}), zstd {} bytes",
        m.size.bytes,
        m.size.parameters,
        m.size.nonzero_parameters,
        m.size.sparsity,
        m.size.zstd_bytes
    );
    for (name, s) in [
        ("batch 1", Some(&m.latency.batch_1)),
        ("batch N", m.latency.batch_n.as_ref()),
    ] {
        if let Some(s) = s {
            let _ = writeln!(
                out,
                "latency {name} (={}): p50 {:.3} ms, p95 {:.3} ms, p99 {:.3} ms, mean {:.3} ms, {:.1} samples/s over {} runs",
                s.batch_size, s.p50_ms, s.p95_ms, s.p99_ms, s.mean_ms, s.throughput_per_s, s.runs
            );
        }
    }
    let _ = writeln!(
        out,
        "runtime: {}, {} thread(s); memory: peak RSS growth {} bytes (load {}) of the whole process (jobs running beside it count too)",
        m.latency.runtime,
        m.latency.intra_op_threads,
        m.memory.peak_rss_growth_bytes,
        m.memory.load_rss_growth_bytes
    );
    out
}
