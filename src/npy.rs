//! `.npy` files of float32 arrays, as NumPy writes and reads them.
//!
//! ```
//! # fn main() -> msad::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("x.npy");
//! let x = ndarray::Array2::<f32>::eye(3).into_dyn();
//! msad::npy::write_f32(&path, &x)?;
//! assert_eq!(msad::npy::read_f32(&path)?, x);
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

use crate::{Error, Result};

/// Reads a float32 `.npy` file of any rank (C or Fortran order).
///
/// A missing file is an [`Error::Io`]; another dtype or a damaged file an [`Error::Npy`].
pub fn read_f32(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    ArrayD::<f32>::read_npy(file).map_err(|e| Error::Npy {
        path: path.into(),
        reason: format!("not a float32 .npy array: {e}"),
    })
}

/// Writes a float32 array as `.npy` (C order).
pub fn write_f32(path: impl AsRef<Path>, array: &ArrayD<f32>) -> Result<()> {
    let path = path.as_ref();
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    array
        .write_npy(BufWriter::new(file))
        .map_err(|e| Error::Npy {
            path: path.into(),
            reason: e.to_string(),
        })
}
