//! A GGUF writer (version 3, as llama.cpp reads it) and ggml's Q8_0 and Q4_0 block quantizers.
//!
//! Layout: magic `GGUF`, version 3, tensor and key counts (u64), the keys (a string, a value
//! type, the value), the tensor infos (name, dimensions in ggml order with the innermost
//! first, ggml type, offset into the data section), zeros up to `general.alignment`, then the
//! tensors, each padded to the alignment, at exactly the offsets their infos give. All
//! little-endian; a string is a u64 length and its bytes.
//!
//! Q8_0 and Q4_0 blocks are those of ggml's reference quantizers (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_0_ref`): 32 weights, an f16 scale first.
//! - Q8_0: `d = max|x| / 127`, codes `round(x / d)` (ties away from zero).
//! - Q4_0: `d = m / -8` with `m` the weight of largest magnitude (the first of equals), codes
//!   `min(15, trunc(x / d + 8.5))`; byte `j` holds weight `j` in its low nibble and weight
//!   `j + 16` in its high nibble.

use std::io::Write;
use std::path::Path;

use engine::StageError;
use half::f16;

use crate::fail;

/// The alignment of tensor data, written as `general.alignment`.
pub const ALIGNMENT: usize = 32;

/// Weights per Q8_0 or Q4_0 block.
pub const BLOCK: usize = 32;

/// A metadata value, with the GGUF value type it is written as.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Strs(_) | Value::I32s(_) => 9,
        }
    }
}

/// The ggml tensor types written here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q8_0,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q8_0 => "Q8_0",
        }
    }
    /// Weights per block (1 for the float types).
    pub fn block(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 => 1,
            GgmlType::Q4_0 | GgmlType::Q8_0 => BLOCK,
        }
    }
    /// The tensor's bytes in this type: `x` row-major, rows of `ne0` (a multiple of the block).
    pub fn encode(self, x: &[f32]) -> Vec<u8> {
        match self {
            GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            GgmlType::Q8_0 => x.chunks_exact(BLOCK).flat_map(q8_0_block).collect(),
            GgmlType::Q4_0 => x.chunks_exact(BLOCK).flat_map(q4_0_block).collect(),
        }
    }
}

/// One Q8_0 block: the f16 scale, then 32 signed codes.
pub fn q8_0_block(x: &[f32]) -> [u8; 34] {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = [0u8; 34];
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
    out
}

/// One Q4_0 block: the f16 scale, then 16 bytes of two codes.
pub fn q4_0_block(x: &[f32]) -> [u8; 18] {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for v in x {
        if v.abs() > amax {
            (amax, max) = (v.abs(), *v);
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let code = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    let mut out = [0u8; 18];
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for j in 0..16 {
        out[2 + j] = code(x[j]) | (code(x[j + 16]) << 4);
    }
    out
}

/// One tensor: its name, its dimensions in PyTorch order (outermost first), its type and its
/// encoded bytes.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

/// A GGUF file being assembled: keys in order, then tensors in order.
#[derive(Default)]
pub struct GgufFile {
    pub kv: Vec<(String, Value)>,
    pub tensors: Vec<TensorEntry>,
}

fn pad(n: usize) -> usize {
    n.next_multiple_of(ALIGNMENT)
}

impl GgufFile {
    pub fn set(&mut self, key: &str, value: Value) {
        self.kv.push((key.to_string(), value));
    }

    /// Add a tensor of `x` (row-major, PyTorch `shape`) encoded as `ty`.
    ///
    /// # Panics
    /// If `x` does not fill `shape`, or the innermost dimension is not a multiple of the type's
    /// block.
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, x: &[f32]) {
        assert_eq!(x.len(), shape.iter().product::<usize>(), "`{name}` does not fill {shape:?}");
        assert!(shape.last().is_some_and(|n| n % ty.block() == 0), "`{name}`: rows of {shape:?} in {ty:?}");
        self.tensors.push(TensorEntry { name: name.to_string(), shape: shape.to_vec(), ty, data: ty.encode(x) });
    }

    /// The whole file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (key, value) in &self.kv {
            put_str(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += pad(t.data.len());
        }
        out.resize(pad(out.len()), 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(pad(out.len()), 0);
        }
        out
    }

    /// Write the file at `path`.
    pub fn write(&self, path: &Path) -> Result<(), StageError> {
        let mut file = std::fs::File::create(path).map_err(|e| fail(format!("creating `{}`", path.display()))(&e))?;
        file.write_all(&self.to_bytes()).map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_str(out, s),
        Value::Strs(items) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|s| put_str(out, s));
        }
        Value::I32s(items) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_at(b: &[u8]) -> f32 {
        f16::from_le_bytes([b[0], b[1]]).to_f32()
    }

    #[test]
    fn q8_0_blocks_follow_the_reference_formula() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 12.5) * 0.1).collect();
        let b = q8_0_block(&x);
        let d = x[31] / 127.0;
        assert_eq!(f16_at(&b), f16::from_f32(d).to_f32(), "the scale is rounded to f16 after the codes");
        for (q, v) in b[2..].iter().zip(&x) {
            assert_eq!(*q as i8, (v * (1.0 / d)).round() as i8);
        }
        assert_eq!(b[2 + 31] as i8, 127);
        // Ties round away from zero: 0.5 steps.
        let mut half = [0.0f32; 32];
        half[0] = 127.0;
        half[1] = 0.5;
        half[2] = -2.5;
        let b = q8_0_block(&half);
        assert_eq!((b[3] as i8, b[4] as i8), (1, -3));
        assert_eq!(q8_0_block(&[0.0; 32]), [0u8; 34]);
    }

    #[test]
    fn q4_0_blocks_take_the_signed_extreme_and_split_the_nibbles() {
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 * 0.25 - 3.0).collect();
        x[7] = -8.0; // the largest magnitude, negative: d = 1
        x[20] = 8.0; // as large, later: the first wins
        let b = q4_0_block(&x);
        assert_eq!(f16_at(&b), 1.0);
        let code = |v: f32| ((v + 8.5) as i8).min(15) as u8;
        for j in 0..16 {
            assert_eq!(b[2 + j] & 15, code(x[j]), "low nibble holds weight {j}");
            assert_eq!(b[2 + j] >> 4, code(x[j + 16]), "high nibble holds weight {}", j + 16);
        }
        assert_eq!(b[2 + 7] & 15, 0);
        assert_eq!(b[2 + 4] >> 4, 15, "8 / 1 + 8.5 = 16.5, clamped to 15");
    }

    /// The header, keys and infos at their byte positions, offsets contiguous and padded.
    #[test]
    fn files_lay_out_keys_infos_and_padded_data() {
        let mut f = GgufFile::default();
        f.set("general.architecture", Value::Str("llama".into()));
        f.set("general.alignment", Value::U32(ALIGNMENT as u32));
        f.set("t", Value::I32s(vec![1, 3]));
        f.add_tensor("a", &[3], GgmlType::F32, &[1.0, 2.0, 3.0]);
        f.add_tensor("b", &[2, 32], GgmlType::Q8_0, &[0.5; 64]);
        let bytes = f.to_bytes();
        assert_eq!(&bytes[..4], b"GGUF");
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        assert_eq!((u32_at(4), u64_at(8), u64_at(16)), (3, 2, 3));
        assert_eq!(u64_at(24), 20);
        assert_eq!(&bytes[32..52], b"general.architecture");
        assert_eq!((u32_at(52), u64_at(56)), (8, 5));
        // Tensor infos: `a` (1 dim of 3, F32, offset 0), `b` (ne = [32, 2], Q8_0, offset 32).
        let infos = bytes.windows(9).position(|w| w == b"\x01\0\0\0\0\0\0\0a").unwrap() + 9;
        assert_eq!((u32_at(infos), u64_at(infos + 4), u32_at(infos + 12), u64_at(infos + 16)), (1, 3, 0, 0));
        let b = infos + 24 + 9;
        assert_eq!((u32_at(b), u64_at(b + 4), u64_at(b + 12), u32_at(b + 20), u64_at(b + 24)), (2, 32, 2, 8, 32));
        let data = (b + 32).next_multiple_of(ALIGNMENT);
        assert!(bytes[b + 32..data].iter().all(|x| *x == 0));
        assert_eq!(&bytes[data..data + 4], &1.0f32.to_le_bytes());
        assert_eq!(bytes.len(), data + 32 + 2 * 34 + (ALIGNMENT - 2 * 34 % ALIGNMENT));
    }
}
