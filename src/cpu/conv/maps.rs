//! The activation layout of the ResNet engines: channel-major, C × B·H·W, so that a conv's
//! output is directly the next conv's input (one product over the whole batch).

use rayon::prelude::*;

/// Activations: `c` channels × `b` images × `h` × `w`, channel-major.
#[derive(Clone, Debug)]
pub(crate) struct Maps {
    pub(crate) data: Vec<f32>,
    pub(crate) c: usize,
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
}

impl Maps {
    /// Positions per channel: B·H·W.
    pub(crate) fn plane(&self) -> usize {
        self.b * self.h * self.w
    }

    /// From B × C × H × W row-major values (`dims` checked by the caller).
    pub(crate) fn from_nchw(nchw: &[f32], dims: [usize; 4]) -> Self {
        let [b, c, h, w] = dims;
        let plane = h * w;
        let mut data = vec![0f32; c * b * plane];
        for img in 0..b {
            for ch in 0..c {
                data[(ch * b + img) * plane..][..plane]
                    .copy_from_slice(&nchw[(img * c + ch) * plane..][..plane]);
            }
        }
        Self { data, c, b, h, w }
    }

    /// Back to B × C × H × W row-major values.
    pub(crate) fn to_nchw(&self) -> Vec<f32> {
        let plane = self.h * self.w;
        let mut nchw = vec![0f32; self.data.len()];
        for img in 0..self.b {
            for ch in 0..self.c {
                nchw[(img * self.c + ch) * plane..][..plane]
                    .copy_from_slice(&self.data[(ch * self.b + img) * plane..][..plane]);
            }
        }
        nchw
    }

    /// Global average pooling: B × C, row-major.
    pub(crate) fn global_average(&self) -> Vec<f32> {
        let hw = self.h * self.w;
        let mut pooled = vec![0f32; self.b * self.c];
        for ch in 0..self.c {
            for img in 0..self.b {
                let s: f32 = self.data[(ch * self.b + img) * hw..][..hw].iter().sum();
                pooled[img * self.c + ch] = s / hw as f32;
            }
        }
        pooled
    }

    /// The gradient with respect to these maps of a loss whose gradient with respect to
    /// [`Maps::global_average`] is `d` (B × C).
    pub(crate) fn global_average_backward(&self, d: &[f32]) -> Vec<f32> {
        let hw = self.h * self.w;
        let mut out = vec![0f32; self.data.len()];
        out.par_chunks_mut(hw).enumerate().for_each(|(i, dst)| {
            let (ch, img) = (i / self.b, i % self.b);
            dst.fill(d[img * self.c + ch] / hw as f32);
        });
        out
    }
}
