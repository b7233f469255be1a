//! What `shrink submit --wait` writes for CI systems: a Markdown summary and JUnit XML.
use serde_json::Value;

fn number(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:.digits$}"))
}

/// A Markdown table: baseline vs final accuracy, size and latency, then each verdict.
pub fn summary_markdown(job: &Value, report: Option<&Value>) -> String {
    let id = job["id"].as_str().unwrap_or("");
    let status = job["status"].as_str().unwrap_or("");
    let mut out = format!("## Shrink job `{id}`: {status}\n\n");
    let Some(report) = report else {
        let message = job["error"]["message"].as_str().unwrap_or("no report");
        out.push_str(&format!("The job {status}: {message}\n"));
        return out;
    };
    let (b, f) = (&report["baseline"], &report["final"]);
    out.push_str("| | baseline | final |\n|---|---|---|\n");
    let metric = f["task"]["metric"]
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or("top-1 accuracy");
    let score = |m: &Value| {
        let s = &m["task"]["score"];
        number(
            if s.is_null() {
                &m["task"]["top1_accuracy"]
            } else {
                s
            },
            4,
        )
    };
    out.push_str(&format!("| {metric} | {} | {} |\n", score(b), score(f)));
    out.push_str(&format!(
        "| size (bytes) | {} | {} |\n",
        b["size"]["bytes"], f["size"]["bytes"]
    ));
    out.push_str(&format!(
        "| latency p50, batch 1 (ms) | {} | {} |\n",
        number(&b["latency"]["batch_1"]["p50_ms"], 3),
        number(&f["latency"]["batch_1"]["p50_ms"], 3)
    ));
    let verdicts = report["verdicts"].as_array().cloned().unwrap_or_default();
    if !verdicts.is_empty() {
        out.push_str("\n| constraint | limit | actual | verdict |\n|---|---|---|---|\n");
        for v in verdicts {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                v["constraint"].as_str().unwrap_or(""),
                v["limit"],
                number(&v["actual"], 4),
                if v["passed"] == true {
                    "pass"
                } else {
                    "**fail**"
                }
            ));
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JUnit XML: one test case per verdict (or one for the job, when it did not succeed).
pub fn junit_xml(job: &Value, report: Option<&Value>) -> String {
    let id = job["id"].as_str().unwrap_or("");
    let mut cases = Vec::new();
    match report {
        Some(r) => {
            for v in r["verdicts"].as_array().into_iter().flatten() {
                let name = xml_escape(v["constraint"].as_str().unwrap_or(""));
                let detail = xml_escape(v["detail"].as_str().unwrap_or(""));
                cases.push(if v["passed"] == true {
                    format!("    <testcase classname=\"shrink.{id}\" name=\"{name}\"/>\n")
                } else {
                    format!("    <testcase classname=\"shrink.{id}\" name=\"{name}\">\n      <failure message=\"{detail}\"/>\n    </testcase>\n")
                });
            }
        }
        None => {
            let message = xml_escape(
                job["error"]["message"]
                    .as_str()
                    .unwrap_or("the job did not succeed"),
            );
            cases.push(format!(
                "    <testcase classname=\"shrink.{id}\" name=\"job\">\n      <failure message=\"{message}\"/>\n    </testcase>\n"
            ));
        }
    }
    let failures = cases.iter().filter(|c| c.contains("<failure")).count();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"shrink\" tests=\"{}\" failures=\"{failures}\">\n{}  </testsuite>\n</testsuites>\n",
        cases.len(),
        cases.concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn junit_has_one_case_per_verdict_and_escapes_details() {
        let job = json!({"id": "j1", "status": "succeeded"});
        let report = json!({"verdicts": [
            {"constraint": "max_accuracy_drop", "passed": true, "detail": "ok"},
            {"constraint": "max_size_bytes", "passed": false, "detail": "size 9 > 1 & <more>"}
        ]});
        let xml = junit_xml(&job, Some(&report));
        assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
        assert!(xml.contains("size 9 &gt; 1 &amp; &lt;more&gt;"), "{xml}");
    }
}
