//! `.npy` files of float32 arrays, as NumPy writes and reads them.
//!
//! Reading checks the header against the file before anything is allocated: the dtype must be
//! float32, and the file's length must be exactly the header plus 4 bytes per element of the
//! shape it claims, so a 100-byte file whose header claims 2⁴⁰ elements is an error, not an
//! allocation. [`read_f32_shaped`] also checks the shape against an expected one.
//!
//! ```
//! # fn main() -> msad::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("x.npy");
//! let x = ndarray::Array2::<f32>::eye(3).into_dyn();
//! msad::npy::write_f32(&path, &x)?;
//! assert_eq!(msad::npy::read_f32(&path)?, x);
//! assert_eq!(msad::npy::read_header(&path)?.shape, vec![3, 3]);
//! assert!(msad::npy::read_f32_shaped(&path, &[3, 4]).is_err());
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

use crate::{Error, Result};

/// The largest header read (NumPy's own reader refuses more than 10,000 bytes by default).
const MAX_HEADER_BYTES: usize = 65_536;
/// The most dimensions accepted (NumPy's limit is 64).
const MAX_DIMS: usize = 64;

/// What a `.npy` header says, checked against the file's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// The array's shape.
    pub shape: Vec<usize>,
    /// Whether the data is in Fortran (column-major) order.
    pub fortran_order: bool,
    /// Where the data starts in the file.
    pub data_offset: u64,
}

/// Reads and checks the header of a float32 `.npy` file without reading its data.
///
/// Errors: [`Error::Io`] for a file that cannot be read; [`Error::Npy`] for a file that is not
/// `.npy`, holds another dtype, or whose length differs from what its header claims.
pub fn read_header(path: impl AsRef<Path>) -> Result<NpyHeader> {
    let path = path.as_ref();
    let bad = |reason: String| Error::Npy {
        path: path.into(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut preamble = [0u8; 8];
    file.read_exact(&mut preamble)
        .map_err(|_| bad("not a .npy file: shorter than its magic string".into()))?;
    if &preamble[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file: no \\x93NUMPY magic string".into()));
    }
    let (len_bytes, utf8) = match preamble[6] {
        1 => (2, false),
        2 => (4, false),
        3 => (4, true),
        major => return Err(bad(format!("unknown .npy format version {major}"))),
    };
    let mut len_field = [0u8; 4];
    file.read_exact(&mut len_field[..len_bytes])
        .map_err(|_| bad("truncated .npy header".into()))?;
    let header_len = u32::from_le_bytes(len_field) as usize;
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header of {header_len} bytes (at most {MAX_HEADER_BYTES} are read)"
        )));
    }
    let data_offset = (8 + len_bytes + header_len) as u64;
    if data_offset > file_len {
        return Err(bad(format!(
            "header claims {header_len} bytes, the file has {file_len} in all"
        )));
    }
    let mut header = vec![0u8; header_len];
    file.read_exact(&mut header)
        .map_err(|_| bad("truncated .npy header".into()))?;
    let header = if utf8 {
        String::from_utf8(header).map_err(|_| bad("header is not UTF-8".into()))?
    } else {
        header.iter().map(|&b| b as char).collect()
    };
    let descr = dict_value(&header, "descr").ok_or_else(|| bad("header has no 'descr'".into()))?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    if !matches!(descr, "<f4" | "|f4" | "=f4" | ">f4") {
        return Err(bad(format!("dtype `{descr}`, expected float32 (`<f4`)")));
    }
    let fortran_order = match dict_value(&header, "fortran_order").map(str::trim) {
        Some("False") => false,
        Some("True") => true,
        other => {
            return Err(bad(format!(
                "fortran_order is {other:?}, expected True or False"
            )));
        }
    };
    let shape_text =
        dict_value(&header, "shape").ok_or_else(|| bad("header has no 'shape'".into()))?;
    let shape =
        parse_shape(shape_text).map_err(|reason| bad(format!("shape {shape_text}: {reason}")))?;
    let elements = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| {
            bad(format!(
                "shape {shape:?} has more elements than can be addressed"
            ))
        })?;
    let expected = elements
        .checked_mul(4)
        .and_then(|b| b.checked_add(data_offset))
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    if expected != file_len {
        return Err(bad(format!(
            "header claims shape {shape:?} ({elements} float32 values, {expected} bytes with the \
             header), the file has {file_len} bytes"
        )));
    }
    Ok(NpyHeader {
        shape,
        fortran_order,
        data_offset,
    })
}

/// Reads a float32 `.npy` file of any rank (C or Fortran order), after checking its header
/// ([`read_header`]).
///
/// A missing file is an [`Error::Io`]; another dtype or a damaged file an [`Error::Npy`].
pub fn read_f32(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    read_header(path)?;
    read_checked(path)
}

/// [`read_f32`] for an array that must have exactly `shape`: any other shape is an
/// [`Error::InvalidShape`] naming the file, found before the data is read.
pub fn read_f32_shaped(path: impl AsRef<Path>, shape: &[usize]) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let header = read_header(path)?;
    if header.shape != shape {
        return Err(Error::InvalidShape {
            what: path.display().to_string(),
            expected: format!("{shape:?}"),
            found: header.shape,
        });
    }
    read_checked(path)
}

/// The data of a file whose header passed [`read_header`].
fn read_checked(path: &Path) -> Result<ArrayD<f32>> {
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

/// The text of `key`'s value in a header dict (`{'descr': '<f4', 'shape': (2, 3), }`), up to
/// the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let quoted = [format!("'{key}'"), format!("\"{key}\"")];
    let start = quoted
        .iter()
        .find_map(|q| header.find(q.as_str()).map(|i| i + q.len()))?;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.checked_sub(1)?,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
        if depth == 0 && c == ')' {
            return Some(&rest[..=i]);
        }
    }
    None
}

/// `(3, 4)`, `(5,)` or `()` as dimensions.
fn parse_shape(text: &str) -> std::result::Result<Vec<usize>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or("not a tuple")?;
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("`{d}` is not a size"))
        })
        .collect::<std::result::Result<_, _>>()?;
    if dims.len() > MAX_DIMS {
        return Err(format!("{} dimensions (at most {MAX_DIMS})", dims.len()));
    }
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_found_at_the_top_level() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }";
        assert_eq!(dict_value(h, "descr"), Some("'<f4'"));
        assert_eq!(dict_value(h, "fortran_order"), Some("False"));
        assert_eq!(
            parse_shape(dict_value(h, "shape").unwrap()).unwrap(),
            vec![3, 4]
        );
        assert_eq!(parse_shape("(5,)").unwrap(), vec![5]);
        assert_eq!(parse_shape("()").unwrap(), Vec::<usize>::new());
        assert!(parse_shape("(-1, 2)").is_err());
        assert!(parse_shape("3").is_err());
    }
}
