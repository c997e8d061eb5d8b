//! Model weights on disk: the parameter map as safetensors, f32, Hugging Face names.
//!
//! Bytes are deterministic: the safetensors crate orders tensors by name within each dtype,
//! and the only metadata is `format = pt` (what `transformers` expects).

use std::collections::HashMap;
use std::path::Path;

use engine::StageError;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::fail;
use crate::nn::params::{ParamMap, Tensor};

/// Write every tensor of the map as little-endian f32.
pub fn save_safetensors(path: &Path, params: &ParamMap) -> Result<(), StageError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|(name, t)| {
            (name.to_string(), t.shape().to_vec(), t.data().iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.as_str(), v))
                .map_err(|e| fail(format!("tensor `{name}`"))(&e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let out = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| fail("serializing safetensors")(&e))?;
    std::fs::write(path, out).map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
}

/// Read every f32 tensor of a safetensors file.
pub fn load_safetensors(path: &Path) -> Result<ParamMap, StageError> {
    let bytes = std::fs::read(path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("`{}` is not a safetensors file", path.display()))(&e))?;
    let mut params = ParamMap::default();
    for name in file.names() {
        let view = file.tensor(name).map_err(|e| fail(format!("tensor `{name}`"))(&e))?;
        if view.dtype() != Dtype::F32 {
            return Err(StageError::msg(format!(
                "`{}`: tensor `{name}` is {:?}, expected F32",
                path.display(),
                view.dtype()
            )));
        }
        let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        params.insert(name, Tensor::from_vec(view.shape(), data));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gpt2::{forward, Activations, Gpt2Config};

    #[test]
    fn weights_written_and_read_back_give_identical_logits_and_bytes() {
        let cfg = Gpt2Config { vocab_size: 13, block_size: 6, n_layer: 2, n_head: 2, n_embd: 8, bias: true };
        let params = cfg.init(9);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_safetensors(&path, &params).unwrap();
        let loaded = load_safetensors(&path).unwrap();
        assert_eq!(loaded, params);
        let ids = [1u32, 5, 7, 12, 0, 3];
        let mut a = Activations::new(&cfg, 1, 6);
        let mut b = Activations::new(&cfg, 1, 6);
        forward(&cfg, &params, &ids, &mut a);
        forward(&cfg, &loaded, &ids, &mut b);
        assert!(a.logits.iter().zip(&b.logits).all(|(x, y)| x.to_bits() == y.to_bits()));
        let again = dir.path().join("again.safetensors");
        save_safetensors(&again, &loaded).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap(), "writing is deterministic");
    }

    #[test]
    fn a_file_that_is_not_safetensors_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not a model").unwrap();
        let err = load_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors` is not a safetensors file"), "{err}");
    }
}
