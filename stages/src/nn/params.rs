//! The one named parameter map: Hugging Face names to tensors. Freezing, adapters, optimizer
//! state and safetensors I/O will all work on this map.

use std::collections::BTreeMap;

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

/// Parameters (or their gradients, or optimizer moments) by Hugging Face name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamMap {
    tensors: BTreeMap<String, Tensor>,
}

impl ParamMap {
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }
    /// # Panics
    /// If the model asks for a parameter it did not create: a bug, not a user error.
    pub fn get(&self, name: &str) -> &[f32] {
        self.tensors.get(name).unwrap_or_else(|| panic!("no parameter `{name}`")).data()
    }
    pub fn get_mut(&mut self, name: &str) -> &mut [f32] {
        self.tensors.get_mut(name).unwrap_or_else(|| panic!("no parameter `{name}`")).data_mut()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.tensors.iter_mut().map(|(k, v)| (k.as_str(), v))
    }
    /// The same names and shapes, all zeros: gradients and optimizer moments.
    pub fn zeros_like(&self) -> ParamMap {
        ParamMap { tensors: self.tensors.iter().map(|(k, t)| (k.clone(), Tensor::zeros(t.shape()))).collect() }
    }
    pub fn fill_zero(&mut self) {
        for t in self.tensors.values_mut() {
            t.data_mut().fill(0.0);
        }
    }
    pub fn num_elements(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }
}
