//! The `finetune` stage: the current model trains on `train_dataset_id`; with labels on
//! cross-entropy, without on T²·KL to the model as it entered the stage. A pruned model keeps
//! its zeros.
use super::recovery::{epoch_notes, Setup};
use super::{StageContext, StageOutcome};
use crate::domain::finetune::{FinetuneOptions, DEFAULT_ALPHA, DEFAULT_TEMPERATURE};
use crate::engine::train::distill;
use crate::engine::{prune::Masks, quantize, Result};

/// A weight with at least this share of exact zeros was pruned: fine-tuning keeps them zero.
const SPARSE_SHARE: f64 = 0.2;

pub fn run(f: &FinetuneOptions, ctx: &StageContext<'_>) -> Result<StageOutcome> {
    let current = ctx.current;
    let setup = Setup::new(
        ctx,
        &f.recovery,
        current,
        (DEFAULT_ALPHA, DEFAULT_TEMPERATURE),
        &crate::domain::training::TrainingDefaults::STANDARD,
        "a finetune stage",
    )?;
    let pair = distill::Pair {
        rt: ctx.rt,
        teacher: current,
        student: &current.proto,
        output: &setup.output,
        train: &setup.fit_data,
        validation: Some(&setup.validation),
    };
    let masks = Masks::of_zeros(&current.proto, SPARSE_SHARE);
    let out = distill::distill_with(pair, masks.training_hook()?, &setup.recipe, ctx.progress)?;
    let mut notes = vec![
        format!(
            "fine-tuned {} parameters on {} with {}",
            out.student_parameters,
            setup.rows_note(),
            setup.loss_note("the model before the stage")
        ),
        setup.schedule_note.clone(),
    ];
    if !masks.is_empty() {
        notes.push(format!(
            "the zeros of {} sparse weights ({}) were held",
            masks.0.len(),
            masks.0.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    notes.extend(epoch_notes(&out.report, setup.validation_metric));
    let training = Some(setup.curve(&out.report, None));
    let mut trained = out.model;
    masks.apply(&mut trained);
    Ok(StageOutcome {
        model: Some(quantize::finish(ctx.rt, &trained)?),
        notes,
        training,
        ..Default::default()
    })
}
