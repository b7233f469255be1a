//! The files a job's models become: the one place that names and encodes them, so a new
//! format (or a second file per stage) is added here and nowhere else.
use crate::engine::onnx::LoadedModel;
use bytes::Bytes;

/// One file to store with the job.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub name: String,
    pub bytes: Bytes,
    pub content_type: &'static str,
}

/// The formats a model is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// ONNX protobuf, read by ONNX Runtime, OpenVINO and TensorRT.
    Onnx,
}

impl ModelFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "onnx",
        }
    }

    fn encode(self, model: &LoadedModel) -> Artifact {
        match self {
            ModelFormat::Onnx => Artifact {
                name: String::new(),
                bytes: model.bytes.clone(),
                content_type: "application/octet-stream",
            },
        }
    }
}

/// The model a stage produced, as `stage-<index>-<stage>.<ext>`.
pub fn stage_artifact(index: usize, stage: &str, model: &LoadedModel) -> Artifact {
    let format = ModelFormat::Onnx;
    Artifact {
        name: format!("stage-{index}-{stage}.{}", format.extension()),
        ..format.encode(model)
    }
}

/// The job's final model, as `model.<ext>`.
pub fn final_artifact(model: &LoadedModel) -> Artifact {
    let format = ModelFormat::Onnx;
    Artifact {
        name: format!("model.{}", format.extension()),
        ..format.encode(model)
    }
}
