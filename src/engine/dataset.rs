//! Datasets: `.npz` and `.safetensors` files of named tensors, one row per sample along axis 0.
//!
//! [`summarize_file`] reads only headers (uploads of any size stay cheap); [`load`] reads the data;
//! [`bind`] matches tensors to a model's inputs and finds the labels.
use crate::domain::dataset::{DatasetFormat, DatasetSummary, TensorInfo};
use crate::domain::model::{Dim, ModelSummary};
use crate::engine::{EngineError, Result};
use half::f16;
use npyz::{npz::NpzArchive, DType, TypeChar};
use std::path::Path;

/// Tensor names that hold integer class labels.
pub const LABEL_NAMES: &[&str] = &["labels", "y"];
/// Names a single-input model also accepts for its input.
pub const SINGLE_INPUT_ALIASES: &[&str] = &["x", "input"];

/// Element storage of a dataset tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
    /// Text, one string per element (numpy `<U` arrays): CTC labels.
    Str(Vec<String>),
}

impl TensorData {
    pub fn dtype(&self) -> &'static str {
        match self {
            Self::F32(_) => "float32",
            Self::F64(_) => "float64",
            Self::F16(_) => "float16",
            Self::I8(_) => "int8",
            Self::U8(_) => "uint8",
            Self::I32(_) => "int32",
            Self::I64(_) => "int64",
            Self::Bool(_) => "bool",
            Self::Str(_) => "str",
        }
    }

    /// Integer values, for labels; None for float and bool tensors.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        Some(match self {
            Self::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Self::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Self::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Self::I64(v) => v.clone(),
            _ => return None,
        })
    }
}

/// A named tensor with its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    /// Elements per sample (product of the non-batch dims).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// A loaded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub summary: DatasetSummary,
    pub tensors: Vec<Tensor>,
}

impl Dataset {
    /// A dataset with no tensors, for code paths that read none.
    pub fn empty() -> Dataset {
        Dataset {
            summary: DatasetSummary {
                format: crate::domain::dataset::DatasetFormat::Npz,
                tensors: vec![],
                samples: 0,
            },
            tensors: vec![],
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A dataset of the given rows (in that order) of every tensor.
    pub fn select(&self, rows: &[usize]) -> Dataset {
        fn gather<T: Clone>(v: &[T], row: usize, rows: &[usize]) -> Vec<T> {
            rows.iter()
                .flat_map(|&r| v[r * row..(r + 1) * row].iter().cloned())
                .collect()
        }
        let tensors: Vec<Tensor> = self
            .tensors
            .iter()
            .map(|t| {
                let row = t.row_len();
                let data = match &t.data {
                    TensorData::F32(v) => TensorData::F32(gather(v, row, rows)),
                    TensorData::F64(v) => TensorData::F64(gather(v, row, rows)),
                    TensorData::F16(v) => TensorData::F16(gather(v, row, rows)),
                    TensorData::I8(v) => TensorData::I8(gather(v, row, rows)),
                    TensorData::U8(v) => TensorData::U8(gather(v, row, rows)),
                    TensorData::I32(v) => TensorData::I32(gather(v, row, rows)),
                    TensorData::I64(v) => TensorData::I64(gather(v, row, rows)),
                    TensorData::Bool(v) => TensorData::Bool(gather(v, row, rows)),
                    TensorData::Str(v) => TensorData::Str(gather(v, row, rows)),
                };
                let mut shape = t.shape.clone();
                shape[0] = rows.len();
                Tensor {
                    name: t.name.clone(),
                    shape,
                    data,
                }
            })
            .collect();
        let mut summary = self.summary.clone();
        summary.samples = rows.len() as u64;
        for info in summary.tensors.iter_mut() {
            info.shape[0] = rows.len() as u64;
        }
        Dataset { summary, tensors }
    }
}

/// One tensor's rows followed by another's (same element type and row shape), or None.
fn concat_rows(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    fn cat<T: Clone>(a: &[T], b: &[T]) -> Vec<T> {
        a.iter().chain(b).cloned().collect()
    }
    if a.shape[1..] != b.shape[1..] {
        return None;
    }
    let data = match (&a.data, &b.data) {
        (TensorData::F32(x), TensorData::F32(y)) => TensorData::F32(cat(x, y)),
        (TensorData::F64(x), TensorData::F64(y)) => TensorData::F64(cat(x, y)),
        (TensorData::F16(x), TensorData::F16(y)) => TensorData::F16(cat(x, y)),
        (TensorData::I8(x), TensorData::I8(y)) => TensorData::I8(cat(x, y)),
        (TensorData::U8(x), TensorData::U8(y)) => TensorData::U8(cat(x, y)),
        (TensorData::I32(x), TensorData::I32(y)) => TensorData::I32(cat(x, y)),
        (TensorData::I64(x), TensorData::I64(y)) => TensorData::I64(cat(x, y)),
        (TensorData::Bool(x), TensorData::Bool(y)) => TensorData::Bool(cat(x, y)),
        _ => return None,
    };
    let mut shape = a.shape.clone();
    shape[0] += b.shape[0];
    Some(Tensor {
        name: a.name.clone(),
        shape,
        data,
    })
}

/// The training rows of `labelled` followed by those of `unlabelled`, as one dataset holding
/// `model`'s inputs (named as in `labelled`) and, when `labelled` has labels, int64 labels in which
/// every unit of an unlabelled row is -1 (no loss term and no score reads it). The labels of
/// `unlabelled`, if it has any, are not read.
pub fn merge_unlabelled(
    labelled: &Dataset,
    unlabelled: &Dataset,
    model: &ModelSummary,
) -> Result<Dataset> {
    let lb = bind(model, &labelled.summary)?;
    let ub = bind(model, &unlabelled.summary)?;
    let mut tensors = Vec::new();
    for ((input, ln), (_, un)) in lb.inputs.iter().zip(&ub.inputs) {
        let (a, b) = (
            labelled.tensor(ln).expect("bound"),
            unlabelled.tensor(un).expect("bound"),
        );
        let merged = concat_rows(a, b).ok_or_else(|| EngineError::InvalidDataset {
            tensor: un.clone(),
            problem: format!(
                "the unlabelled rows of input `{input}` are {} {:?} per row but the training rows are {} {:?}: both must have the same element type and row shape (pad text to one length)",
                b.data.dtype(),
                &b.shape[1..],
                a.data.dtype(),
                &a.shape[1..]
            ),
        })?;
        tensors.push(merged);
    }
    if let Some(name) = &lb.labels {
        let l = labelled.tensor(name).expect("bound");
        let values = l.data.to_i64().ok_or_else(|| EngineError::InvalidDataset {
            tensor: name.clone(),
            problem: "training needs integer class labels".into(),
        })?;
        let extra = unlabelled.summary.samples as usize * l.row_len();
        tensors.push(Tensor {
            name: name.clone(),
            shape: {
                let mut s = l.shape.clone();
                s[0] += unlabelled.summary.samples as usize;
                s
            },
            data: TensorData::I64(values.into_iter().chain(vec![-1; extra]).collect()),
        });
    }
    let samples = labelled.summary.samples + unlabelled.summary.samples;
    let summary = DatasetSummary {
        format: labelled.summary.format,
        tensors: tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                dtype: t.data.dtype().to_string(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            })
            .collect(),
        samples,
    };
    Ok(Dataset { summary, tensors })
}

/// How a dataset feeds a model: model input -> dataset tensor, and where the labels are.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub inputs: Vec<(String, String)>,
    pub labels: Option<String>,
    pub samples: u64,
}

fn unreadable(e: impl std::fmt::Display) -> EngineError {
    EngineError::UnreadableDataset(e.to_string())
}

/// Detects the format from the file's first bytes: npz files are zip archives.
pub fn detect_format(path: &Path) -> Result<DatasetFormat> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    if n == 4 && &magic == b"PK\x03\x04" {
        Ok(DatasetFormat::Npz)
    } else if n >= 4 {
        Ok(DatasetFormat::Safetensors)
    } else {
        Err(unreadable(
            "the file is too short to be .npz or .safetensors",
        ))
    }
}

/// Reads tensor names, dtypes and shapes without reading the data, and checks the sample axis.
pub fn summarize_file(path: &Path) -> Result<DatasetSummary> {
    let format = detect_format(path)?;
    let tensors = match format {
        DatasetFormat::Npz => npz_headers(path)?,
        DatasetFormat::Safetensors => safetensors_headers(path)?,
    };
    summary_from(format, tensors)
}

fn summary_from(format: DatasetFormat, mut tensors: Vec<TensorInfo>) -> Result<DatasetSummary> {
    if tensors.is_empty() {
        return Err(unreadable("the file holds no tensors"));
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(t) = tensors.iter().find(|t| t.shape.is_empty()) {
        return Err(EngineError::InvalidDataset {
            tensor: t.name.clone(),
            problem: "is a scalar; every tensor needs a sample axis (axis 0)".into(),
        });
    }
    let first = &tensors[0];
    if let Some(other) = tensors.iter().find(|t| t.shape[0] != first.shape[0]) {
        return Err(EngineError::InvalidDataset {
            tensor: other.name.clone(),
            problem: format!(
                "has {} samples along axis 0 but `{}` has {}; all tensors must agree on the sample count",
                other.shape[0], first.name, first.shape[0]
            ),
        });
    }
    let samples = first.shape[0];
    if samples == 0 {
        return Err(unreadable("the dataset has no samples"));
    }
    Ok(DatasetSummary {
        format,
        tensors,
        samples,
    })
}

fn npy_dtype(name: &str, dtype: &DType) -> Result<&'static str> {
    let DType::Plain(ts) = dtype else {
        return Err(EngineError::InvalidDataset {
            tensor: name.into(),
            problem: "structured (record) arrays are not supported".into(),
        });
    };
    Ok(match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4) => "float32",
        (TypeChar::Float, 8) => "float64",
        (TypeChar::Float, 2) => "float16",
        (TypeChar::Int, 1) => "int8",
        (TypeChar::Uint, 1) => "uint8",
        (TypeChar::Int, 4) => "int32",
        (TypeChar::Int, 8) => "int64",
        (TypeChar::Bool, 1) => "bool",
        (TypeChar::UnicodeStr, _) => "str",
        _ => {
            return Err(EngineError::InvalidDataset {
                tensor: name.into(),
                problem: format!("dtype `{ts}` is not supported; use float32, float64, float16, int8, uint8, int32, int64, bool or str (text labels)"),
            })
        }
    })
}

fn npz_headers(path: &Path) -> Result<Vec<TensorInfo>> {
    let mut archive = NpzArchive::open(path).map_err(unreadable)?;
    let names: Vec<String> = archive.array_names().map(str::to_string).collect();
    let mut out = Vec::new();
    for name in names {
        let npy = archive
            .by_name(&name)
            .map_err(unreadable)?
            .ok_or_else(|| unreadable(format!("missing {name}")))?;
        out.push(TensorInfo {
            dtype: npy_dtype(&name, &npy.dtype())?.into(),
            shape: npy.shape().to_vec(),
            name,
        });
    }
    Ok(out)
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)?;
    // SAFETY: Shrink maps its own stored copies, which nothing modifies while they are read.
    Ok(unsafe { memmap2::Mmap::map(&file)? })
}

fn st_dtype(name: &str, d: safetensors::Dtype) -> Result<&'static str> {
    use safetensors::Dtype as D;
    Ok(match d {
        D::F32 => "float32",
        D::F64 => "float64",
        D::F16 => "float16",
        D::I8 => "int8",
        D::U8 => "uint8",
        D::I32 => "int32",
        D::I64 => "int64",
        D::BOOL => "bool",
        other => {
            return Err(EngineError::InvalidDataset {
                tensor: name.into(),
                problem: format!("dtype {other:?} is not supported"),
            })
        }
    })
}

fn safetensors_headers(path: &Path) -> Result<Vec<TensorInfo>> {
    let map = map_file(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| unreadable(format!("neither .npz nor a valid .safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        out.push(TensorInfo {
            dtype: st_dtype(&name, info.dtype)?.into(),
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            name,
        });
    }
    Ok(out)
}

/// Reads every tensor of a dataset file.
pub fn load(path: &Path) -> Result<Dataset> {
    let summary = summarize_file(path)?;
    let tensors = match summary.format {
        DatasetFormat::Npz => load_npz(path)?,
        DatasetFormat::Safetensors => load_safetensors(path)?,
    };
    Ok(Dataset { summary, tensors })
}

fn load_npz(path: &Path) -> Result<Vec<Tensor>> {
    let mut archive = NpzArchive::open(path).map_err(unreadable)?;
    let names: Vec<String> = archive.array_names().map(str::to_string).collect();
    let mut out = Vec::new();
    for name in names {
        let npy = archive
            .by_name(&name)
            .map_err(unreadable)?
            .ok_or_else(|| unreadable(format!("missing {name}")))?;
        if npy.order() == npyz::Order::Fortran && npy.shape().len() > 1 {
            return Err(EngineError::InvalidDataset {
                tensor: name,
                problem: "is stored in Fortran order; save it with numpy.ascontiguousarray".into(),
            });
        }
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        let data = match npy_dtype(&name, &npy.dtype())? {
            "float32" => TensorData::F32(npy.into_vec().map_err(unreadable)?),
            "float64" => TensorData::F64(npy.into_vec().map_err(unreadable)?),
            "float16" => TensorData::F16(npy.into_vec().map_err(unreadable)?),
            "int8" => TensorData::I8(npy.into_vec().map_err(unreadable)?),
            "uint8" => TensorData::U8(npy.into_vec().map_err(unreadable)?),
            "int32" => TensorData::I32(npy.into_vec().map_err(unreadable)?),
            "int64" => TensorData::I64(npy.into_vec().map_err(unreadable)?),
            "str" => TensorData::Str(npy.into_vec().map_err(unreadable)?),
            _ => TensorData::Bool(npy.into_vec().map_err(unreadable)?),
        };
        out.push(Tensor { name, shape, data });
    }
    Ok(out)
}

fn load_safetensors(path: &Path) -> Result<Vec<Tensor>> {
    let map = map_file(path)?;
    let st = safetensors::SafeTensors::deserialize(&map[..]).map_err(unreadable)?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let bytes = view.data();
        let le = |n: usize| bytes.chunks_exact(n);
        let data = match st_dtype(&name, view.dtype())? {
            "float32" => TensorData::F32(
                le(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "float64" => TensorData::F64(
                le(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "float16" => TensorData::F16(
                le(2)
                    .map(|c| f16::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "int8" => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            "uint8" => TensorData::U8(bytes.to_vec()),
            "int32" => TensorData::I32(
                le(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "int64" => TensorData::I64(
                le(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            _ => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        out.push(Tensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok(out)
}

/// Matches dataset tensors to the model's inputs and checks names, dtypes and shapes.
pub fn bind(model: &ModelSummary, data: &DatasetSummary) -> Result<Binding> {
    let find = |name: &str| data.tensors.iter().find(|t| t.name == name);
    let mut inputs = Vec::new();
    for input in &model.inputs {
        let tensor = find(&input.name).or_else(|| {
            (model.inputs.len() == 1)
                .then(|| SINGLE_INPUT_ALIASES.iter().find_map(|a| find(a)))
                .flatten()
        });
        let Some(tensor) = tensor else {
            let available: Vec<&str> = data.tensors.iter().map(|t| t.name.as_str()).collect();
            return Err(EngineError::InvalidDataset {
                tensor: input.name.clone(),
                problem: format!(
                    "the model needs input `{}` ({} {}) but the dataset has no tensor of that name (it has: {})",
                    input.name,
                    input.dtype,
                    shape_text(&input.shape),
                    available.join(", ")
                ),
            });
        };
        if tensor.dtype == "str" {
            return Err(EngineError::InvalidDataset {
                tensor: tensor.name.clone(),
                problem: format!(
                    "holds text, but model input `{}` expects {}; only labels may be text",
                    input.name, input.dtype
                ),
            });
        }
        if tensor.dtype != input.dtype {
            return Err(EngineError::InvalidDataset {
                tensor: tensor.name.clone(),
                problem: format!(
                    "has dtype {} but model input `{}` expects {}",
                    tensor.dtype, input.name, input.dtype
                ),
            });
        }
        if tensor.shape.len() != input.shape.len() {
            return Err(EngineError::InvalidDataset {
                tensor: tensor.name.clone(),
                problem: format!(
                    "has shape {:?} but model input `{}` expects rank {} {}",
                    tensor.shape,
                    input.name,
                    input.shape.len(),
                    shape_text(&input.shape)
                ),
            });
        }
        for (axis, (have, want)) in tensor.shape.iter().zip(&input.shape).enumerate().skip(1) {
            if let Dim::Fixed(n) = want {
                if *n >= 0 && *have != *n as u64 {
                    return Err(EngineError::InvalidDataset {
                        tensor: tensor.name.clone(),
                        problem: format!(
                            "has size {have} on axis {axis} but model input `{}` expects {} {}",
                            input.name,
                            n,
                            shape_text(&input.shape)
                        ),
                    });
                }
            }
        }
        inputs.push((input.name.clone(), tensor.name.clone()));
    }
    let labels = LABEL_NAMES
        .iter()
        .find_map(|n| find(n))
        .filter(|t| !inputs.iter().any(|(_, used)| used == &t.name));
    if let Some(l) = labels {
        check_labels(l)?;
    }
    Ok(Binding {
        inputs,
        labels: labels.map(|l| l.name.clone()),
        samples: data.samples,
    })
}

/// Labels are integer class ids, one per sample `[N]`, per pixel `[N, H, W]` or per position
/// `[N, T]` (CTC: a padded class-id sequence), or one string per sample (CTC text).
fn check_labels(l: &TensorInfo) -> Result<()> {
    let problem = if l.dtype == "str" {
        (l.shape.len() != 1).then(|| {
            format!(
                "text labels must hold one string per sample (shape [N]), got {:?}",
                l.shape
            )
        })
    } else if !matches!(l.dtype.as_str(), "int8" | "uint8" | "int32" | "int64") {
        Some(format!(
            "labels must be integer class ids, got {} (text labels are taken for CTC models)",
            l.dtype
        ))
    } else if !(1..=3).contains(&l.shape.len()) {
        Some(format!(
            "labels must have shape [N] (one class per sample), [N, T] (per position) or [N, H, W] (per pixel), got {:?}",
            l.shape
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(EngineError::InvalidDataset {
            tensor: l.name.clone(),
            problem,
        }),
        None => Ok(()),
    }
}

fn shape_text(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => n.to_string(),
            Dim::Symbolic(s) => s.clone(),
        })
        .collect();
    format!("[{}]", dims.join(", "))
}
