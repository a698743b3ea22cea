//! What both ends of a KV transfer must agree on, and the hash they compare at handshake.

use rkyv::{Archive, Deserialize, Serialize};

/// Element type of KV on the wire (and in both pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub enum KvDtype {
    F16,
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }

    /// Stable wire code.
    pub fn code(self) -> u8 {
        match self {
            KvDtype::F16 => 1,
            KvDtype::F32 => 2,
        }
    }
}

/// The KV cache geometry of a model: a block of one layer holds `block_size` positions of
/// `n_kv_heads × head_dim` keys, then as many values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct KvLayout {
    /// Identifies the weights (e.g. the model file's name and size): two nodes with the same
    /// shapes but different weights must not exchange KV.
    pub model_id: String,
    pub n_layers: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Bytes of the keys (or of the values) of one block in one layer.
    pub fn half_block_bytes(&self) -> usize {
        self.block_size as usize * self.n_kv_heads as usize * self.head_dim as usize * self.dtype.bytes()
    }

    /// Bytes of keys plus values of one block in one layer: the unit a KV frame carries.
    pub fn block_layer_bytes(&self) -> usize {
        2 * self.half_block_bytes()
    }

    /// XXH3 over every field: equal hashes mean the two pools can exchange blocks byte for byte.
    pub fn compat_hash(&self) -> u64 {
        let mut bytes = Vec::with_capacity(self.model_id.len() + 32);
        bytes.extend_from_slice(&(self.model_id.len() as u64).to_le_bytes());
        bytes.extend_from_slice(self.model_id.as_bytes());
        for v in [self.n_layers, self.n_kv_heads, self.head_dim, self.block_size] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.push(self.dtype.code());
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }

    /// Which fields differ, for the refusal message.
    pub fn diff(&self, other: &KvLayout) -> String {
        let mut out = Vec::new();
        if self.model_id != other.model_id {
            out.push(format!("model {:?} vs {:?}", self.model_id, other.model_id));
        }
        for (name, a, b) in [
            ("layers", self.n_layers, other.n_layers),
            ("kv heads", self.n_kv_heads, other.n_kv_heads),
            ("head dim", self.head_dim, other.head_dim),
            ("block size", self.block_size, other.block_size),
        ] {
            if a != b {
                out.push(format!("{name} {a} vs {b}"));
            }
        }
        if self.dtype != other.dtype {
            out.push(format!("dtype {:?} vs {:?}", self.dtype, other.dtype));
        }
        if out.is_empty() { "no field differs".into() } else { out.join(", ") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_field_change_changes_the_hash() {
        let base = KvLayout {
            model_id: "m".into(),
            n_layers: 30,
            n_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            dtype: KvDtype::F16,
        };
        let variants = [
            KvLayout { model_id: "n".into(), ..base.clone() },
            KvLayout { n_layers: 31, ..base.clone() },
            KvLayout { n_kv_heads: 4, ..base.clone() },
            KvLayout { head_dim: 128, ..base.clone() },
            KvLayout { block_size: 32, ..base.clone() },
            KvLayout { dtype: KvDtype::F32, ..base.clone() },
        ];
        for v in variants {
            assert_ne!(v.compat_hash(), base.compat_hash(), "{}", base.diff(&v));
            assert_ne!(base.diff(&v), "no field differs");
        }
        assert_eq!(base.block_layer_bytes(), 2 * 16 * 3 * 64 * 2);
    }
}
