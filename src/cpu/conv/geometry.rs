//! A conv's layout as the engines cover it, and how one input is cut into column chunks.

use super::maps::Maps;
use crate::{Error, Result};

/// Largest im2col buffer, in floats (32 MiB): wider convs are computed in column chunks.
pub(crate) const IM2COL_FLOATS: usize = 8 << 20;

/// A conv the CPU engines compute: square `k` × `k` kernel, the same stride both ways,
/// torchvision's padding k / 2 on every side, no dilation, no groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvShape {
    /// Input channels.
    pub(crate) cin: usize,
    /// Output channels.
    pub(crate) cout: usize,
    /// Kernel size.
    pub(crate) k: usize,
    /// Stride.
    pub(crate) stride: usize,
    /// Zero padding on every side (k / 2).
    pub(crate) pad: usize,
}

/// A conv's layout as a model describes it, for [`ConvShape::new`] to accept or refuse.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvLayout {
    /// The weight's dimensions: C_out × C_in × kh × kw.
    pub(crate) weight_dims: [usize; 4],
    /// Stride (rows, columns).
    pub(crate) stride: [usize; 2],
    /// Explicit padding (top, left, bottom, right), or `None` for any other padding rule.
    pub(crate) padding: Option<[usize; 4]>,
    /// Dilation (rows, columns).
    pub(crate) dilation: [usize; 2],
    /// Groups.
    pub(crate) groups: usize,
}

impl ConvShape {
    /// The shape of a conv with `layout`, or [`Error::Unsupported`] naming what the engines do
    /// not cover (`what` names the layer).
    pub(crate) fn new(what: &str, layout: ConvLayout) -> Result<Self> {
        let [cout, cin, kh, kw] = layout.weight_dims;
        let unsupported = |reason: String| Error::Unsupported {
            engine: "cpu",
            what: what.to_string(),
            reason,
        };
        let Some([t, l, b, r]) = layout.padding else {
            return Err(unsupported("padding that is not explicit".into()));
        };
        if kh != kw || kh == 0 {
            return Err(unsupported(format!(
                "a {kh} × {kw} kernel (square ones only)"
            )));
        }
        // Padding k / 2 keeps every output at least 1 × 1 for inputs of 1 × 1 or more.
        if [t, l, b, r] != [kh / 2; 4] {
            return Err(unsupported(format!(
                "padding {:?} (only k / 2 = {} on every side)",
                [t, l, b, r],
                kh / 2
            )));
        }
        if layout.stride[0] != layout.stride[1] || layout.stride[0] == 0 {
            return Err(unsupported(format!("stride {:?}", layout.stride)));
        }
        if layout.dilation != [1, 1] || layout.groups != 1 {
            return Err(unsupported(format!(
                "dilation {:?}, groups {}",
                layout.dilation, layout.groups
            )));
        }
        Ok(Self {
            cin,
            cout,
            k: kh,
            stride: layout.stride[0],
            pad: kh / 2,
        })
    }

    /// Rows of the im2col matrix: C_in·k·k.
    pub(crate) fn patch(&self) -> usize {
        self.cin * self.k * self.k
    }

    /// The output map (ho, wo) of this conv on an h × w map.
    pub(crate) fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let (k, s, p) = (self.k, self.stride, self.pad);
        ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1)
    }

    /// How the conv of `x` is computed.
    pub(crate) fn plan(&self, x: &Maps) -> ConvPlan {
        let (ho, wo) = self.output_size(x.h, x.w);
        let direct = self.k == 1 && self.stride == 1 && self.pad == 0;
        let rows_total = x.b * ho;
        let rows_per_chunk = if direct {
            rows_total
        } else {
            (IM2COL_FLOATS / (self.patch() * wo).max(1)).clamp(1, rows_total)
        };
        ConvPlan {
            ho,
            wo,
            rows_total,
            rows_per_chunk,
            direct,
        }
    }
}

/// The output of one conv of one input, and its cut into column chunks of whole output rows
/// (one image row of `wo` positions each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvPlan {
    /// Output height.
    pub(crate) ho: usize,
    /// Output width.
    pub(crate) wo: usize,
    /// Output rows of all images: B·ho.
    pub(crate) rows_total: usize,
    /// Output rows per chunk.
    pub(crate) rows_per_chunk: usize,
    /// Whether the conv reads its input directly (1x1, stride 1, no padding: no im2col).
    pub(crate) direct: bool,
}

impl ConvPlan {
    /// Output positions per channel: B·ho·wo.
    pub(crate) fn columns(&self) -> usize {
        self.rows_total * self.wo
    }

    /// The chunks, in order.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = Chunk> + use<> {
        let (total, per, wo) = (self.rows_total, self.rows_per_chunk, self.wo);
        (0..total)
            .step_by(per.max(1))
            .enumerate()
            .map(move |(index, r0)| Chunk {
                index,
                rows: r0..(r0 + per).min(total),
                wo,
            })
    }
}

/// Output rows `rows` (of all images, B·ho in all) of a conv: one chunk of its columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// Position among the chunks (0 first).
    pub(crate) index: usize,
    /// The output rows.
    pub(crate) rows: std::ops::Range<usize>,
    /// Output positions per row.
    pub(crate) wo: usize,
}

impl Chunk {
    /// Columns: output positions in the chunk.
    pub(crate) fn width(&self) -> usize {
        self.rows.len() * self.wo
    }

    /// The first column, in the B·ho·wo columns of the output.
    pub(crate) fn first_column(&self) -> usize {
        self.rows.start * self.wo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(k: usize, pad: usize) -> ConvLayout {
        ConvLayout {
            weight_dims: [4, 3, k, k],
            stride: [2, 2],
            padding: Some([pad; 4]),
            dilation: [1, 1],
            groups: 1,
        }
    }

    #[test]
    fn layouts_outside_the_engines_are_refused_by_name() {
        assert!(ConvShape::new("conv1", layout(3, 1)).is_ok());
        let err = ConvShape::new("layer1.0.conv2", layout(3, 0)).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("layer1.0.conv2"), "{err}");
        let grouped = ConvLayout {
            groups: 2,
            ..layout(3, 1)
        };
        assert!(ConvShape::new("g", grouped).is_err());
    }

    #[test]
    fn chunks_cover_every_output_row_once() {
        let shape = ConvShape::new("c", layout(3, 1)).unwrap();
        let x = Maps {
            data: Vec::new(),
            c: 3,
            b: 3,
            h: 9,
            w: 7,
        };
        let plan = ConvPlan {
            rows_per_chunk: 4,
            ..shape.plan(&x)
        };
        let rows: Vec<usize> = plan.chunks().flat_map(|c| c.rows).collect();
        assert_eq!(rows, (0..plan.rows_total).collect::<Vec<_>>());
        assert_eq!(
            plan.chunks().last().unwrap().index,
            plan.rows_total.div_ceil(4) - 1
        );
    }
}
