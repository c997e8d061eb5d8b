//! The one named parameter map: Hugging Face names to tensors. Freezing, adapters, optimizer
//! state and safetensors I/O all work on this map.
//!
//! Tensors live in a vector in insertion order; a model resolves each name to a [`ParamId`]
//! once, so the step loop indexes instead of hashing strings, and can borrow two tensors
//! mutably at once (a norm's weight and bias gradients).

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::nn::quant::QMatrix;

/// A dense f32 tensor, row-major.
///
/// Invariant: `data.len()` is the product of `shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }
    /// # Panics
    /// If `data` does not hold exactly the elements of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "data does not fit shape {shape:?}");
        Tensor { shape: shape.to_vec(), data }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

/// A parameter's position in a [`ParamMap`]; valid for maps with the same names in the same
/// order (the parameters, their gradients and optimizer moments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId(usize);

/// Parameters (or their gradients, or optimizer moments) by Hugging Face name.
///
/// A weight matrix may be held quantized instead ([`ParamMap::insert_quantized`]): its f32
/// tensor is then empty, and the layers that read it (linear layers, the embedding) use the
/// [`QMatrix`], stored (out, in) whatever the layer's layout. Such a map is for inference only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamMap {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    quantized: Vec<Option<Arc<QMatrix>>>,
    index: BTreeMap<String, usize>,
}

impl ParamMap {
    /// Add a tensor, or replace the one with this name.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => {
                self.tensors[i] = tensor;
                self.quantized[i] = None;
            }
            None => {
                self.index.insert(name.clone(), self.tensors.len());
                self.names.push(name);
                self.tensors.push(tensor);
                self.quantized.push(None);
            }
        }
    }
    /// Add a quantized weight matrix (or replace the tensor of this name with it).
    pub fn insert_quantized(&mut self, name: impl Into<String>, q: QMatrix) {
        let name = name.into();
        self.insert(name.clone(), Tensor::zeros(&[0]));
        let i = self.index[&name];
        self.quantized[i] = Some(Arc::new(q));
    }
    /// The quantized form of a parameter, if it is held so.
    pub fn quantized(&self, id: ParamId) -> Option<&QMatrix> {
        self.quantized[id.0].as_deref()
    }
    /// Whether any parameter is held quantized.
    pub fn has_quantized(&self) -> bool {
        self.quantized.iter().any(Option::is_some)
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).map(|&i| ParamId(i))
    }
    /// # Panics
    /// If the model asks for a parameter it did not create: a bug, not a user error.
    pub fn get(&self, name: &str) -> &[f32] {
        self.tensor(name).data()
    }
    pub fn get_mut(&mut self, name: &str) -> &mut [f32] {
        self.tensor_mut(name).data_mut()
    }
    pub fn tensor(&self, name: &str) -> &Tensor {
        let i = self.index.get(name).copied().unwrap_or_else(|| panic!("no parameter `{name}`"));
        &self.tensors[i]
    }
    pub fn tensor_mut(&mut self, name: &str) -> &mut Tensor {
        let i = self.index.get(name).copied().unwrap_or_else(|| panic!("no parameter `{name}`"));
        &mut self.tensors[i]
    }
    pub fn at(&self, id: ParamId) -> &[f32] {
        self.tensors[id.0].data()
    }
    pub fn at_mut(&mut self, id: ParamId) -> &mut [f32] {
        self.tensors[id.0].data_mut()
    }
    /// Two different tensors, both mutable.
    ///
    /// # Panics
    /// If `a == b`.
    pub fn pair_mut(&mut self, a: ParamId, b: ParamId) -> (&mut [f32], &mut [f32]) {
        assert_ne!(a, b, "pair_mut of one tensor");
        let (lo, hi) = (a.0.min(b.0), a.0.max(b.0));
        let (left, right) = self.tensors.split_at_mut(hi);
        let (x, y) = (left[lo].data_mut(), right[0].data_mut());
        if a.0 < b.0 {
            (x, y)
        } else {
            (y, x)
        }
    }
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// In insertion order, which is the same for maps made by [`ParamMap::zeros_like`].
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.tensors)
    }
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.names.iter().map(String::as_str).zip(&mut self.tensors)
    }
    /// The same names, order and shapes, all zeros: gradients and optimizer moments.
    pub fn zeros_like(&self) -> ParamMap {
        ParamMap {
            names: self.names.clone(),
            tensors: self.tensors.iter().map(|t| Tensor::zeros(t.shape())).collect(),
            quantized: vec![None; self.names.len()],
            index: self.index.clone(),
        }
    }
    /// The same names and order, zeros shaped like the tensors for which `trainable` holds
    /// and empty for the others: the gradients and moments of a partly frozen model.
    pub fn zeros_like_trainable(&self, trainable: impl Fn(&str) -> bool) -> ParamMap {
        ParamMap {
            names: self.names.clone(),
            tensors: self
                .iter()
                .map(|(name, t)| Tensor::zeros(if trainable(name) { t.shape() } else { &[0] }))
                .collect(),
            quantized: vec![None; self.names.len()],
            index: self.index.clone(),
        }
    }
    /// The tensors in order, for passes over all of them at once.
    pub(crate) fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
    pub(crate) fn tensors_mut(&mut self) -> &mut [Tensor] {
        &mut self.tensors
    }
    /// Every tensor zeroed, all of them in one parallel pass.
    pub fn fill_zero(&mut self) {
        let chunks = self.tensors.par_iter_mut().flat_map(|t| t.data_mut().par_chunks_mut(1 << 14));
        chunks.for_each(|c| c.fill(0.0));
    }
    pub fn num_elements(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_index_and_pairs_borrow_two_tensors() {
        let mut p = ParamMap::default();
        p.insert("b", Tensor::from_vec(&[2], vec![1.0, 2.0]));
        p.insert("a", Tensor::from_vec(&[1], vec![3.0]));
        p.insert("b", Tensor::from_vec(&[2], vec![4.0, 5.0]));
        assert_eq!(p.len(), 2);
        let (a, b) = (p.id("a").unwrap(), p.id("b").unwrap());
        assert_eq!(p.at(b), &[4.0, 5.0]);
        let (x, y) = p.pair_mut(a, b);
        x[0] += y[1];
        assert_eq!(p.get("a"), &[8.0]);
        assert_eq!(p.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(p.zeros_like().id("a"), Some(a));
    }
}
