//! Hugging Face checkpoints: every `*.safetensors` file of a model directory (one file or many
//! shards), memory-mapped, in float32, float16 or bfloat16, converted to float32 on load.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::model::weights::{RawDtype, RawTensor};
use crate::model::{ModelError, Tensor, WeightSource};

pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> where it lies: its file (index into `files`), dtype, shape and byte range.
    index: HashMap<String, Entry>,
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

/// Where one tensor lies in its file: dtype, shape and byte range (inside the file's bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: std::ops::Range<usize>,
}

/// Reads a safetensors file's header: every tensor's name and where it lies in `bytes` (the
/// whole file). The `safetensors` crate checks the header's size, JSON, dtypes and that each
/// tensor's byte range matches its shape and lies inside the file.
pub fn read_header(bytes: &[u8]) -> Result<Vec<(String, HeaderEntry)>, String> {
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    Ok(tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            // The view's bytes lie inside `bytes`; their offset is where they start.
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            (name, HeaderEntry { dtype: view.dtype(), shape: view.shape().to_vec(), bytes: start..start + view.data().len() })
        })
        .collect())
}

/// The shard file names a `model.safetensors.index.json` names in its `weight_map`, sorted and
/// without repeats. Each must be a plain file name in the model's directory: an index is data
/// from a download, and must not make the server open `../../anything`.
pub fn index_shards(index_json: &[u8]) -> Result<Vec<String>, String> {
    let index: serde_json::Value = serde_json::from_slice(index_json).map_err(|e| e.to_string())?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or("`weight_map` is missing or not an object")?;
    let mut files = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| format!("`weight_map.{tensor}` is not a string"))?;
        let plain = Path::new(file).components().collect::<Vec<_>>();
        if !matches!(plain.as_slice(), [std::path::Component::Normal(name)] if *name == std::ffi::OsStr::new(file)) {
            return Err(format!("`weight_map.{tensor}`: {file:?} is not a file name in the model's directory"));
        }
        files.push(file.to_string());
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err("`weight_map` names no file".into());
    }
    Ok(files)
}

impl SafetensorsSource {
    /// The shards `model.safetensors.index.json` names, if the directory has one (repositories
    /// may ship other `*.safetensors` files beside the shards); else every `*.safetensors` file.
    fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            let text = std::fs::read(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let files = index_shards(&text).map_err(|e| ModelError::Format(format!("{}: {e}", index_path.display())))?;
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
        Ok(std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
            .collect())
    }

    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let mut paths = Self::shard_paths(dir)?;
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::Format(format!("no *.safetensors file in {}", dir.display())));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the map is read-only and the file is not expected to change while we run;
            // this is how every safetensors loader reads checkpoints.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let header = read_header(&mmap).map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
            for (name, entry) in header {
                index.insert(name, Entry { file: i, dtype: entry.dtype, shape: entry.shape, bytes: entry.bytes });
            }
            files.push((path, mmap));
        }
        let activation_scales = index.keys().filter(|name| name.ends_with(".input_scale")).count();
        if activation_scales > 0 {
            // Static FP8 activation scales: vLLM quantizes each product's input with them; here the
            // weights are read as value × scale and the activations stay at full precision.
            tracing::warn!(activation_scales, "the checkpoint's FP8 input_scale tensors are not used: activations are not quantized");
        }
        Ok(SafetensorsSource { files, index })
    }
}

impl SafetensorsSource {
    fn unsupported(&self, hf_name: &str, entry: &Entry) -> ModelError {
        ModelError::Unsupported(format!(
            "`{hf_name}` in {} has dtype {:?} (supported: F32, F16, BF16, and F8_E4M3 with a `weight_scale`)",
            self.files[entry.file].0.display(),
            entry.dtype
        ))
    }

    fn bytes(&self, entry: &Entry) -> &[u8] {
        &self.files[entry.file].1[entry.bytes.clone()]
    }

    /// The values of a float tensor (F32, F16 or BF16).
    fn floats(&self, hf_name: &str, entry: &Entry) -> Result<Vec<f32>, ModelError> {
        let bytes = self.bytes(entry);
        Ok(match entry.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            _ => return Err(self.unsupported(hf_name, entry)),
        })
    }

    /// An FP8 checkpoint's weight (vLLM's and llm-compressor's `fp8` format): E4M3 values and a
    /// `<name>_scale` tensor beside them, one scale for the tensor (`[]` or `[1]`) or one per
    /// output row (`[rows]` or `[rows, 1]`). Read as `value · scale`. Block-wise scales
    /// (`weight_scale_inv`, DeepSeek's 128 x 128 blocks) are refused by name.
    fn fp8(&self, hf_name: &str, entry: &Entry) -> Result<Vec<f32>, ModelError> {
        let file = self.files[entry.file].0.display();
        let scale_name = format!("{hf_name}_scale");
        let Some(scale_entry) = self.index.get(&scale_name) else {
            let block = if self.index.contains_key(&format!("{hf_name}_scale_inv")) {
                " (it has block-wise `weight_scale_inv` scales, which are not supported)"
            } else {
                ""
            };
            return Err(ModelError::Unsupported(format!("`{hf_name}` in {file} is F8_E4M3 without a `{scale_name}`{block}")));
        };
        let scales = self.floats(&scale_name, scale_entry)?;
        let rows = entry.shape.first().copied().unwrap_or(1);
        let per_row = match scale_entry.shape.as_slice() {
            [] | [1] => false,
            [r] | [r, 1] if *r == rows => true,
            shape => {
                return Err(ModelError::Unsupported(format!(
                    "`{scale_name}` in {file} has shape {shape:?}: an FP8 weight of {rows} rows takes one scale, or one per row"
                )))
            }
        };
        if let Some(bad) = scales.iter().find(|s| !s.is_finite()) {
            return Err(ModelError::Format(format!("`{scale_name}` in {file} holds {bad}")));
        }
        let bytes = self.bytes(entry);
        let cols = if rows == 0 { 0 } else { bytes.len() / rows };
        Ok(bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| float8::F8E4M3::from_bits(b).to_f32() * scales[if per_row { i / cols.max(1) } else { 0 }])
            .collect())
    }
}

impl WeightSource for SafetensorsSource {
    fn raw(&self, hf_name: &str) -> Result<Option<RawTensor<'_>>, ModelError> {
        let Some(entry) = self.index.get(hf_name) else {
            return Ok(None);
        };
        let dtype = match entry.dtype {
            Dtype::F32 => RawDtype::F32,
            Dtype::F16 => RawDtype::F16,
            Dtype::BF16 => RawDtype::BF16,
            // Scaled on the host by `load` (a device store then holds it in its own precision).
            Dtype::F8_E4M3 => return Ok(None),
            _ => return Err(self.unsupported(hf_name, entry)),
        };
        let bytes = &self.files[entry.file].1[entry.bytes.clone()];
        Ok(Some(RawTensor { dtype, shape: entry.shape.clone(), bytes, interleaved_qk_head_dim: None }))
    }

    fn load(&self, hf_name: &str, _expected_shape: &[usize]) -> Result<Option<Tensor>, ModelError> {
        let Some(entry) = self.index.get(hf_name) else {
            return Ok(None);
        };
        let data = match entry.dtype {
            Dtype::F8_E4M3 => self.fp8(hf_name, entry)?,
            _ => self.floats(hf_name, entry)?,
        };
        Tensor::new(entry.shape.clone(), data).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    #[test]
    fn reads_fp8_weights_with_their_scales() {
        let dir = tempfile::tempdir().unwrap();
        let values = [1.0f32, -2.0, 0.5, 448.0, -0.25, 3.0];
        let fp8: Vec<u8> = values.iter().map(|&v| float8::F8E4M3::from_f32(v).to_bits()).collect();
        let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (per_row, per_tensor, bad, nan) = (f32s(&[0.5, 2.0]), f32s(&[0.25]), f32s(&[1.0, 1.0, 1.0]), f32s(&[f32::NAN]));
        let tensors = vec![
            ("rows.weight".to_string(), TensorView::new(Dtype::F8_E4M3, vec![2, 3], &fp8).unwrap()),
            ("rows.weight_scale".to_string(), TensorView::new(Dtype::F32, vec![2, 1], &per_row).unwrap()),
            ("whole.weight".to_string(), TensorView::new(Dtype::F8_E4M3, vec![2, 3], &fp8).unwrap()),
            ("whole.weight_scale".to_string(), TensorView::new(Dtype::F32, vec![], &per_tensor).unwrap()),
            ("bare.weight".to_string(), TensorView::new(Dtype::F8_E4M3, vec![2, 3], &fp8).unwrap()),
            ("blocks.weight".to_string(), TensorView::new(Dtype::F8_E4M3, vec![2, 3], &fp8).unwrap()),
            ("blocks.weight_scale_inv".to_string(), TensorView::new(Dtype::F32, vec![1], &per_tensor).unwrap()),
            ("odd.weight".to_string(), TensorView::new(Dtype::F8_E4M3, vec![2, 3], &fp8).unwrap()),
            ("odd.weight_scale".to_string(), TensorView::new(Dtype::F32, vec![3], &bad).unwrap()),
            ("nan.weight".to_string(), TensorView::new(Dtype::F8_E4M3, vec![2, 3], &fp8).unwrap()),
            ("nan.weight_scale".to_string(), TensorView::new(Dtype::F32, vec![1], &nan).unwrap()),
        ];
        safetensors::serialize_to_file(tensors, None, &dir.path().join("model.safetensors")).unwrap();
        let source = SafetensorsSource::open(dir.path()).unwrap();
        assert!(source.raw("rows.weight").unwrap().is_none(), "FP8 goes through `load`, scaled on the host");
        let rows = source.load("rows.weight", &[2, 3]).unwrap().unwrap();
        assert_eq!(rows.data, vec![0.5, -1.0, 0.25, 896.0, -0.5, 6.0]);
        let whole = source.load("whole.weight", &[2, 3]).unwrap().unwrap();
        assert_eq!(whole.data, values.iter().map(|v| v * 0.25).collect::<Vec<_>>());
        let err = |name: &str| source.load(name, &[2, 3]).err().unwrap().to_string();
        assert!(err("bare.weight").contains("without a `bare.weight_scale`"), "{}", err("bare.weight"));
        assert!(err("blocks.weight").contains("block-wise"), "{}", err("blocks.weight"));
        assert!(err("odd.weight").contains("has shape [3]"), "{}", err("odd.weight"));
        assert!(err("nan.weight").contains("NaN"), "{}", err("nan.weight"));
    }

    #[test]
    fn reads_sharded_mixed_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let f32_bytes: Vec<u8> = [1.0f32, -2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = [0.5f32, 3.0, -1.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let a = TensorView::new(Dtype::F32, vec![2], &f32_bytes).unwrap();
        let b = TensorView::new(Dtype::BF16, vec![1, 3], &bf16_bytes).unwrap();
        safetensors::serialize_to_file([("a", a)], None, &dir.path().join("model-00001.safetensors")).unwrap();
        safetensors::serialize_to_file([("b", b)], None, &dir.path().join("model-00002.safetensors")).unwrap();

        let source = SafetensorsSource::open(dir.path()).unwrap();
        assert_eq!(source.load("a", &[2]).unwrap().unwrap().data, vec![1.0, -2.5]);
        let b = source.load("b", &[1, 3]).unwrap().unwrap();
        assert_eq!((b.shape, b.data), (vec![1, 3], vec![0.5, 3.0, -1.0]));
        assert!(source.load("missing", &[1]).unwrap().is_none());
        let raw = source.raw("b").unwrap().unwrap();
        assert_eq!((raw.dtype, raw.shape.as_slice(), raw.bytes), (RawDtype::BF16, &[1usize, 3][..], &bf16_bytes[..]));

        // With an index, only the files it names are read.
        let stray = TensorView::new(Dtype::F32, vec![2], &f32_bytes).unwrap();
        safetensors::serialize_to_file([("a", stray)], None, &dir.path().join("consolidated.safetensors")).unwrap();
        let index = serde_json::json!({"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let source = SafetensorsSource::open(dir.path()).unwrap();
        assert_eq!(source.files.len(), 2);

        // An index that points outside the directory is refused before anything is opened.
        let escape = serde_json::json!({"weight_map": {"a": "../model-00001.safetensors"}});
        std::fs::write(dir.path().join("model.safetensors.index.json"), escape.to_string()).unwrap();
        let err = SafetensorsSource::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("not a file name in the model's directory"), "{err}");
    }

    #[test]
    fn index_shards_are_plain_file_names() {
        let shards = |json: &str| index_shards(json.as_bytes());
        assert_eq!(shards(r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#).unwrap(), vec!["m-1.safetensors", "m-2.safetensors"]);
        for bad in ["/etc/passwd", "../x.safetensors", "sub/x.safetensors", "..", ".", "", "./x.safetensors", "x.safetensors/"] {
            let json = serde_json::json!({"weight_map": {"t": bad}}).to_string();
            assert!(shards(&json).is_err(), "{bad:?} was accepted");
        }
        for bad in ["[]", "{}", r#"{"weight_map": []}"#, r#"{"weight_map": {}}"#, r#"{"weight_map": {"a": 1}}"#, "not json"] {
            assert!(shards(bad).is_err(), "{bad}");
        }
    }
}
