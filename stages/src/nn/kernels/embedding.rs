//! Token and position embeddings: a row lookup forward, a scatter-add backward.

/// `out[r] = table[ids[r]]` for each of the rows; `table` is (V, C).
///
/// # Panics
/// If an id is not below V.
pub fn embedding_forward(ids: &[u32], table: &[f32], out: &mut [f32], c: usize) {
    let v = table.len() / c;
    for (row, &id) in out.chunks_mut(c).zip(ids) {
        let id = id as usize;
        assert!(id < v, "token id {id} is outside the vocabulary of {v}");
        row.copy_from_slice(&table[id * c..(id + 1) * c]);
    }
}

/// `dtable[ids[r]] += dout[r]`, in row order (a token that repeats accumulates in a fixed
/// order, so the bits do not depend on threads).
pub fn embedding_backward(ids: &[u32], dout: &[f32], dtable: &mut [f32], c: usize) {
    for (row, &id) in dout.chunks(c).zip(ids) {
        let id = id as usize;
        for (d, g) in dtable[id * c..(id + 1) * c].iter_mut().zip(row) {
            *d += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, probe_loss, random};

    #[test]
    fn lookup_and_scatter_add_match_finite_differences() {
        let (v, c, ids) = (5, 3, [4u32, 0, 4, 2]);
        let (table, probe) = (random(v * c, 1), random(ids.len() * c, 2));
        let forward = |t: &[f32]| {
            let mut out = vec![0.0; ids.len() * c];
            embedding_forward(&ids, t, &mut out, c);
            out
        };
        assert_eq!(&forward(&table)[..c], &table[4 * c..5 * c]);
        let mut dtable = vec![0.0; v * c];
        embedding_backward(&ids, &probe, &mut dtable, c);
        assert!(dtable[c..2 * c].iter().all(|g| *g == 0.0), "an unused row gets no gradient");
        check("dtable", &table, &dtable, |t| probe_loss(&forward(t), &probe));
    }
}
