//! The `distill` stage: a teacher trains a student. The teacher is the job's current model and
//! the student is uploaded or derived from it (by width or depth); or, with `teacher_model_id`,
//! the uploaded teacher trains the job's current model.
use super::recovery::{batch_norm_note, batch_norm_step, epoch_notes, Setup};
use super::{StageContext, StageOutcome};
use crate::domain::distill::{DistillOptions, StudentSource, DEFAULT_ALPHA, DEFAULT_TEMPERATURE};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::train::distill;
use crate::engine::{quantize, EngineError, Result, SubProgress};

pub fn run(d: &DistillOptions, ctx: &StageContext<'_>) -> Result<StageOutcome> {
    let teacher = ctx.teacher.unwrap_or(ctx.current);
    let mut setup = Setup::new(
        ctx,
        &d.recovery,
        teacher,
        (DEFAULT_ALPHA, DEFAULT_TEMPERATURE),
        &crate::domain::training::TrainingDefaults::STANDARD,
        "a distill stage",
    )?;
    setup.recipe.features = d.features.clone();
    let mut notes = Vec::new();
    let (student, derived) = student(d, ctx, teacher, &setup.output, &mut notes)?;
    // A student cut from the teacher reads statistics the teacher's wider or deeper layers
    // produced: re-estimated before the first step.
    let (student, batch_norm) = if derived {
        let progress = SubProgress {
            parent: ctx.progress,
            start: 0.0,
            span: 0.05,
        };
        let (s, r) = batch_norm_step(ctx, &setup, teacher, &student, &progress)?;
        notes.extend(
            r.as_ref()
                .map(|r| batch_norm_note(r, setup.validation_metric)),
        );
        (s, r)
    } else {
        (student, None)
    };
    let pair = distill::Pair {
        rt: ctx.rt,
        teacher,
        student: &student,
        output: &setup.output,
        train: &setup.fit_data,
        validation: Some(&setup.validation),
    };
    let progress = SubProgress {
        parent: ctx.progress,
        start: if derived { 0.05 } else { 0.0 },
        span: if derived { 0.95 } else { 1.0 },
    };
    let out = distill::distill(pair, &setup.recipe, &progress)?;
    notes.push(format!(
        "trained {} parameters (teacher {}) on {}; loss {}",
        out.student_parameters,
        summarize(&teacher.proto).parameters,
        setup.rows_note(),
        setup.loss_note("the teacher")
    ));
    notes.push(setup.schedule_note.clone());
    for h in &setup.recipe.features {
        notes.push(format!(
            "feature hint: + {}·MSE(student `{}`, teacher `{}`)",
            h.weight,
            h.student_tensor(),
            h.teacher
        ));
    }
    notes.extend(epoch_notes(&out.report, setup.validation_metric));
    Ok(StageOutcome {
        model: Some(quantize::finish(ctx.rt, &out.model)?),
        notes,
        training: Some(setup.curve(&out.report, batch_norm)),
        ..Default::default()
    })
}

/// The student's graph, with a note saying where it came from, and whether it was cut from the
/// teacher (by width or depth).
fn student(
    d: &DistillOptions,
    ctx: &StageContext<'_>,
    teacher: &LoadedModel,
    output: &str,
    notes: &mut Vec<String>,
) -> Result<(ModelProto, bool)> {
    let has_output = |s: &LoadedModel, field: &str| {
        if summarize(&s.proto).outputs.iter().any(|o| o.name == output) {
            Ok(())
        } else {
            Err(EngineError::InvalidOption {
                option: field.into(),
                problem: format!("the student has no output `{output}` like the teacher's"),
            })
        }
    };
    if ctx.teacher.is_some() {
        has_output(ctx.current, "model_id")?;
        notes.push("teacher: the uploaded teacher_model_id; student: the job's model".into());
        return Ok((ctx.current.proto.clone(), false));
    }
    match (d.student, ctx.student) {
        (StudentSource::Uploaded | StudentSource::Auto, Some(s)) => {
            has_output(s, "student_model_id")?;
            notes.push("student: the uploaded student_model_id".to_string());
            Ok((s.proto.clone(), false))
        }
        (StudentSource::Uploaded, None) => Err(EngineError::InvalidOption {
            option: "student_model_id".into(),
            problem: "`student: uploaded` needs student_model_id".into(),
        }),
        (StudentSource::Depth, _) => {
            let (s, note) =
                crate::engine::train::depth::every_other(&teacher.proto, d.keep_every as usize)?;
            notes.push(format!("student: the teacher's depth cut: {note}"));
            Ok((s, true))
        }
        _ => {
            let (s, layer_notes) =
                distill::width_student(&teacher.proto, d.width, d.multiple_of as usize);
            if layer_notes.is_empty() {
                return Err(EngineError::InvalidOption {
                    option: "student".into(),
                    problem: "no layer of this model can be narrowed (every layer's channels reach a Reshape, an output, or an elementwise op with a tensor no layer produces); upload a student instead".into(),
                });
            }
            notes.push(format!(
                "student: the teacher at width {} ({})",
                d.width,
                layer_notes.join("; ")
            ));
            Ok((s, true))
        }
    }
}
