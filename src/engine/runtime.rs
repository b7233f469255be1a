//! ONNX Runtime, loaded at run time from a shared library (the `onnxruntime` wheel ships one).
//!
//! Shrink never silently falls back to another runtime: when the library is missing, loading fails
//! with a message that says where Shrink looked and how to install it.
use crate::engine::dataset::{Dataset, TensorData};
use crate::engine::{EngineError, Result};
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The ONNX Runtime release Shrink is built and tested against (the `onnxruntime` wheel version).
pub const PINNED_VERSION: &str = "1.32.0";

/// A loaded ONNX Runtime library and its environment. One per process.
pub struct Runtime {
    env: ort::environment::Environment,
    pub version: String,
    pub library: PathBuf,
}

static GLOBAL: OnceLock<std::result::Result<Arc<Runtime>, String>> = OnceLock::new();

impl Runtime {
    /// Loads the library once per process (ONNX Runtime can only be loaded once); later calls
    /// return the same runtime, or the same error.
    pub fn global(explicit: Option<&Path>) -> Result<Arc<Runtime>> {
        GLOBAL
            .get_or_init(|| {
                Self::load(explicit)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(EngineError::RuntimeUnavailable)
    }

    fn load(explicit: Option<&Path>) -> std::result::Result<Runtime, String> {
        let library = locate(explicit).ok_or_else(|| {
            format!(
                "no ONNX Runtime library found: set ORT_DYLIB_PATH (or --ort-library) to libonnxruntime.so, \
                 or run scripts/setup-python.sh to install onnxruntime=={PINNED_VERSION} into .venv"
            )
        })?;
        // ort resolves relative paths against the executable's folder, not the working directory.
        let library = std::fs::canonicalize(&library).unwrap_or(library);
        let builder = ort::init_from(&library)
            .map_err(|e| format!("could not load {}: {e}", library.display()))?;
        let env = builder
            .with_name("shrink")
            .build()
            .map_err(|e| format!("could not start ONNX Runtime: {e}"))?;
        let version = version_from_path(&library).unwrap_or_else(|| "unknown".into());
        Ok(Runtime {
            env,
            version,
            library,
        })
    }

    /// Creates a CPU session with `threads` intra-op threads and full graph optimization.
    /// Checks that ONNX Runtime accepts `model`: it parses, type-checks and finds a kernel for
    /// every node. Graph optimizations and weight prepacking are skipped (they only make it run
    /// faster, and cost more than the check itself on large models).
    pub fn check(&self, model: &[u8]) -> Result<()> {
        use ort::session::builder::GraphOptimizationLevel;
        drop(
            Session::builder(&self.env)?
                .with_optimization_level(GraphOptimizationLevel::Disable)
                .map_err(ort::Error::from)?
                .with_prepacking(false)
                .map_err(ort::Error::from)?
                .with_intra_threads(1)
                .map_err(ort::Error::from)?
                .commit_from_memory(model)?,
        );
        Ok(())
    }

    pub fn session(&self, model: &[u8], threads: usize) -> Result<Session> {
        let session = Session::builder(&self.env)?
            .with_intra_threads(threads.max(1))
            .map_err(ort::Error::from)?
            .with_inter_threads(1)
            .map_err(ort::Error::from)?
            .commit_from_memory(model)?;
        Ok(session)
    }
}

/// Where the library is: an explicit path, `ORT_DYLIB_PATH`, or an `onnxruntime` wheel in a
/// project virtualenv or Shrink's data directory, next to the working directory or the executable.
pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let mut bases: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        bases.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        bases.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for base in bases {
        for site in [base.join("shrink-data/onnxruntime"), base.join(".venv/lib")] {
            if let Some(lib) = find_in(&site) {
                return Some(lib);
            }
        }
    }
    None
}

/// Searches `dir` (a pip `--target` folder or a venv's lib folder) for the wheel's library.
pub fn find_in(dir: &Path) -> Option<PathBuf> {
    let mut candidates = vec![dir.join("onnxruntime/capi")];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            candidates.push(e.path().join("site-packages/onnxruntime/capi"));
        }
    }
    for capi in candidates {
        let Ok(files) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut libs: Vec<PathBuf> = files
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so."))
            })
            .collect();
        libs.sort();
        if let Some(lib) = libs.pop() {
            return Some(lib);
        }
    }
    None
}

fn version_from_path(p: &Path) -> Option<String> {
    let name = p.file_name()?.to_str()?;
    let v = name.strip_prefix("libonnxruntime.so.")?;
    Some(v.to_string())
}

/// One output of one run, converted to f32 (integer outputs such as predicted labels too).
#[derive(Debug, Clone)]
pub struct OutputValue {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn text_input(tensor: &str) -> EngineError {
    EngineError::InvalidDataset {
        tensor: tensor.into(),
        problem: "holds text, which no model input takes".into(),
    }
}

/// Builds the inputs for rows `rows` (cycling through the dataset when it has fewer rows than asked).
pub fn feeds<'d>(
    data: &'d Dataset,
    binding: &[(String, String)],
    rows: std::ops::Range<usize>,
) -> Result<Vec<(String, SessionInputValue<'d>)>> {
    let mut out = Vec::new();
    for (input, tensor_name) in binding {
        let t = data
            .tensor(tensor_name)
            .ok_or_else(|| EngineError::InvalidDataset {
                tensor: tensor_name.clone(),
                problem: "missing".into(),
            })?;
        let row = t.row_len();
        let samples = t.shape[0];
        let mut shape = t.shape.clone();
        shape[0] = rows.len();
        let value: SessionInputValue<'d> = if rows.end <= samples {
            let r = rows.start * row..rows.end * row;
            match &t.data {
                TensorData::F32(v) => TensorRef::from_array_view((shape, &v[r]))?.into(),
                TensorData::F64(v) => TensorRef::from_array_view((shape, &v[r]))?.into(),
                TensorData::F16(v) => TensorRef::from_array_view((shape, &v[r]))?.into(),
                TensorData::I8(v) => TensorRef::from_array_view((shape, &v[r]))?.into(),
                TensorData::U8(v) => TensorRef::from_array_view((shape, &v[r]))?.into(),
                TensorData::I32(v) => TensorRef::from_array_view((shape, &v[r]))?.into(),
                TensorData::I64(v) => TensorRef::from_array_view((shape, &v[r]))?.into(),
                TensorData::Bool(v) => TensorRef::from_array_view((shape, &v[r]))?.into(),
                TensorData::Str(_) => return Err(text_input(tensor_name)),
            }
        } else {
            // Latency at a batch larger than the dataset: repeat rows to fill the batch.
            fn cycle<T: Clone>(
                v: &[T],
                row: usize,
                samples: usize,
                rows: &std::ops::Range<usize>,
            ) -> Vec<T> {
                rows.clone()
                    .flat_map(|i| {
                        v[(i % samples) * row..(i % samples + 1) * row]
                            .iter()
                            .cloned()
                    })
                    .collect()
            }
            use ort::value::Tensor;
            match &t.data {
                TensorData::F32(v) => {
                    Tensor::from_array((shape, cycle(v, row, samples, &rows)))?.into()
                }
                TensorData::F64(v) => {
                    Tensor::from_array((shape, cycle(v, row, samples, &rows)))?.into()
                }
                TensorData::F16(v) => {
                    Tensor::from_array((shape, cycle(v, row, samples, &rows)))?.into()
                }
                TensorData::I8(v) => {
                    Tensor::from_array((shape, cycle(v, row, samples, &rows)))?.into()
                }
                TensorData::U8(v) => {
                    Tensor::from_array((shape, cycle(v, row, samples, &rows)))?.into()
                }
                TensorData::I32(v) => {
                    Tensor::from_array((shape, cycle(v, row, samples, &rows)))?.into()
                }
                TensorData::I64(v) => {
                    Tensor::from_array((shape, cycle(v, row, samples, &rows)))?.into()
                }
                TensorData::Bool(v) => {
                    Tensor::from_array((shape, cycle(v, row, samples, &rows)))?.into()
                }
                TensorData::Str(_) => return Err(text_input(tensor_name)),
            }
        };
        out.push((input.clone(), value));
    }
    Ok(out)
}

/// Runs the session once and converts every tensor output to f32.
pub fn run(
    session: &mut Session,
    inputs: Vec<(String, SessionInputValue<'_>)>,
) -> Result<Vec<OutputValue>> {
    let names: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    let outputs = session.run(inputs)?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let value = &outputs[name.as_str()];
        let ValueType::Tensor { ty, .. } = value.dtype() else {
            return Err(EngineError::InvalidModel(format!(
                "output `{name}` is not a tensor (maps and sequences are not supported)"
            )));
        };
        macro_rules! conv {
            ($t:ty) => {{
                let (shape, data) = value.try_extract_tensor::<$t>()?;
                (
                    shape.iter().map(|&d| d as usize).collect::<Vec<_>>(),
                    data.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
                )
            }};
        }
        let (shape, values) = match ty {
            TensorElementType::Float32 => {
                let (shape, data) = value.try_extract_tensor::<f32>()?;
                (shape.iter().map(|&d| d as usize).collect(), data.to_vec())
            }
            TensorElementType::Float64 => conv!(f64),
            TensorElementType::Int64 => conv!(i64),
            TensorElementType::Int32 => conv!(i32),
            TensorElementType::Int8 => conv!(i8),
            TensorElementType::Uint8 => conv!(u8),
            TensorElementType::Float16 => {
                let (shape, data) = value.try_extract_tensor::<half::f16>()?;
                (
                    shape.iter().map(|&d| d as usize).collect(),
                    data.iter().map(|x| x.to_f32()).collect(),
                )
            }
            TensorElementType::Bool => {
                let (shape, data) = value.try_extract_tensor::<bool>()?;
                (
                    shape.iter().map(|&d| d as usize).collect(),
                    data.iter().map(|&x| x as u8 as f32).collect(),
                )
            }
            other => {
                return Err(EngineError::InvalidModel(format!(
                    "output `{name}` has unsupported element type {other:?}"
                )))
            }
        };
        out.push(OutputValue {
            name,
            shape,
            values,
        });
    }
    Ok(out)
}
