//! Several SFT examples in one row (`sft --packing`): per-token positions that restart at each
//! example, and per-query segment starts so attention stays inside each example — the fused
//! kernel takes the starts, the composite path an additive mask. Left-padded rows of batched
//! generation are the same thing with a KV cache: the padding is one segment, the sequence the
//! next, so each row has its own positions and never attends to its padding.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Several examples packed into each row: positions restart at every example and attention
/// stays inside it (no token sees another example), so a packed row computes what its examples
/// would compute one by one.
pub struct Packing {
    /// (B, T) u32 position of each token within its example.
    pub positions: Tensor,
    /// Per (row, query): the key position where that token's example starts in the row.
    pub starts: std::sync::Arc<Vec<u32>>,
    /// Per (row, query): keys before this many stay visible however late the example starts
    /// (a prompt shared by the completions packed after it); None: 0 everywhere.
    pub shared: Option<std::sync::Arc<Vec<u32>>>,
    t: usize,
    /// Positions already in the KV cache before these queries.
    past: usize,
    /// The largest position of any token.
    max_pos: usize,
}

impl Packing {
    /// `segments[b]` = lengths of the examples packed into row b, in order; positions past the
    /// last one (padding) form one more segment.
    pub fn new(segments: &[Vec<usize>], t: usize, dev: &Device) -> Result<Self> {
        let mut starts = Vec::with_capacity(segments.len() * t);
        let mut pos = Vec::with_capacity(segments.len() * t);
        for lens in segments {
            let used: usize = lens.iter().sum();
            if used > t {
                bail!("packed segments of {used} tokens exceed the row length {t}");
            }
            let mut s = 0;
            for &n in lens.iter().chain(std::iter::once(&(t - used))) {
                for i in 0..n {
                    starts.push(s as u32);
                    pos.push(i as u32);
                }
                s += n;
            }
        }
        Self::from_parts(pos, starts, None, (segments.len(), t, 0), dev)
    }

    /// Left-padded rows, `pads[b]` padding tokens before row b's sequence, for the `t` columns
    /// after `past` cached ones: a token at column c has position c − pads[b] (padding: c) and
    /// sees only keys from column pads[b] on (padding sees padding).
    pub fn left_padded(pads: &[usize], past: usize, t: usize, dev: &Device) -> Result<Self> {
        let mut starts = Vec::with_capacity(pads.len() * t);
        let mut pos = Vec::with_capacity(pads.len() * t);
        for &p in pads {
            for c in past..past + t {
                let (s, x) = if c < p { (0, c) } else { (p, c - p) };
                starts.push(s as u32);
                pos.push(x as u32);
            }
        }
        Self::from_parts(pos, starts, None, (pads.len(), t, past), dev)
    }

    /// Groups of completions sharing a prompt, one group per row: `groups[b] = (prompt, lens)`,
    /// the row holding the prompt's `prompt` tokens then each completion's `lens[i]` tokens. A
    /// completion's tokens continue the prompt's positions and see the prompt and themselves,
    /// not the completions before them; what follows the last one (padding) is one segment.
    pub fn shared_prompts(groups: &[(usize, Vec<usize>)], t: usize, dev: &Device) -> Result<Self> {
        Self::shared_prompts_after(0, groups, t, dev)
    }

    /// `shared_prompts` after `past` cached positions every row shares (a few-shot prefix run
    /// once): positions and key columns start at `past`, and every token sees the cache.
    pub fn shared_prompts_after(
        past: usize,
        groups: &[(usize, Vec<usize>)],
        t: usize,
        dev: &Device,
    ) -> Result<Self> {
        let n = groups.len() * t;
        let (mut starts, mut shared, mut pos) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (p, lens) in groups {
            let used = p + lens.iter().sum::<usize>();
            if used > t {
                bail!("a prompt and its completions ({used} tokens) exceed the row length {t}");
            }
            for i in 0..*p {
                starts.push(0);
                shared.push(0);
                pos.push((past + i) as u32);
            }
            let mut s = *p;
            for &l in lens {
                for i in 0..l {
                    starts.push((past + s) as u32);
                    shared.push((past + p) as u32);
                    pos.push((past + p + i) as u32);
                }
                s += l;
            }
            // Padding: its own segment, at the first free position (none beyond the packed ones).
            for _ in used..t {
                starts.push((past + used) as u32);
                shared.push(0);
                pos.push(past as u32);
            }
        }
        Self::from_parts(pos, starts, Some(shared), (groups.len(), t, past), dev)
    }

    /// Per (row, column) positions, segment starts and shared prefixes of `rows` rows of `t`
    /// columns after `past` cached ones.
    fn from_parts(
        pos: Vec<u32>,
        starts: Vec<u32>,
        shared: Option<Vec<u32>>,
        (rows, t, past): (usize, usize, usize),
        dev: &Device,
    ) -> Result<Self> {
        let max_pos = pos.iter().copied().max().unwrap_or(0) as usize;
        Ok(Self {
            positions: Tensor::from_vec(pos, (rows, t), dev)?,
            starts: std::sync::Arc::new(starts),
            shared: shared.map(std::sync::Arc::new),
            t,
            past,
            max_pos,
        })
    }

    /// The kernel's view of the segments.
    pub fn segs(&self) -> crate::kernels::attention::Segs {
        crate::kernels::attention::Segs {
            lo: self.starts.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Positions already cached before these queries.
    pub fn past(&self) -> usize {
        self.past
    }

    /// The largest position of any token.
    pub fn max_position(&self) -> usize {
        self.max_pos
    }

    /// Additive (B, 1, T, n_prefix + past + T) mask hiding keys of other examples.
    pub(crate) fn mask(&self, n_prefix: usize, dev: &Device) -> Result<Tensor> {
        let (t, s) = (self.t, n_prefix + self.past + self.t);
        let b = self.starts.len() / t;
        let mut m = vec![0f32; b * t * s];
        for bi in 0..b {
            for i in 0..t {
                let lo = self.starts[bi * t + i] as usize;
                let sh = self
                    .shared
                    .as_ref()
                    .map_or(0, |v| v[bi * t + i] as usize)
                    .min(lo);
                m[(bi * t + i) * s + n_prefix + sh..(bi * t + i) * s + n_prefix + lo]
                    .fill(f32::MIN);
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, t, s), dev)?)
    }
}
