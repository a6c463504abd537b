//! Host-side arrays: burn tensors to and from `ndarray` arrays of `f32`.
//!
//! ```
//! use burn::tensor::Device;
//! use ndarray::array;
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex();
//! let t = msad::host::tensor_from_array::<2>(array![[1.0f32, 2.0], [3.0, 4.0]].into_dyn(), &device)?;
//! let back = msad::host::array_from_tensor(t)?;
//! assert_eq!(back.shape(), &[2, 2]);
//! assert_eq!(back[[1, 0]], 3.0);
//! # Ok(())
//! # }
//! ```

use burn::tensor::{Device, Tensor, TensorData};
use ndarray::{ArrayD, IxDyn};

use crate::{Error, Result};

/// A `D`-dimensional tensor on `device` holding `array` (any memory layout).
///
/// The array's rank must be `D`: anything else is an [`Error::InvalidShape`].
pub fn tensor_from_array<const D: usize>(array: ArrayD<f32>, device: &Device) -> Result<Tensor<D>> {
    if array.ndim() != D {
        return Err(Error::InvalidShape {
            what: "array".into(),
            expected: format!("{D} dimensions"),
            found: array.shape().to_vec(),
        });
    }
    let shape = array.shape().to_vec();
    let values: Vec<f32> = if array.is_standard_layout() {
        array.into_raw_vec_and_offset().0
    } else {
        array.iter().copied().collect()
    };
    Ok(Tensor::from_data(TensorData::new(values, shape), device))
}

/// The tensor's values, read back to the host in row-major order.
pub fn vec_from_tensor<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>> {
    tensor
        .try_into_data()
        .map_err(|e| Error::Backend(e.to_string()))?
        .try_into_vec_as::<f32>()
        .map_err(|e| Error::Backend(format!("{e:?}")))
}

/// The tensor as an `ndarray` array of the same shape.
pub fn array_from_tensor<const D: usize>(tensor: Tensor<D>) -> Result<ArrayD<f32>> {
    let shape = tensor.dims().to_vec();
    let values = vec_from_tensor(tensor)?;
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| Error::Backend(e.to_string()))
}
