//! The python version of CIFAR-10 and CIFAR-100: pickled dicts, bytes to labels and pixels.
//!
//! This file uses `std` only, so that the fuzz crate (`fuzz/`) can include it by path next to
//! [`super::cifar_format`], whose [`Records`] it returns: the same labels and pixels as the
//! binary version's parser, so both versions of the archives read alike.
//!
//! # The files
//!
//! `cifar-10-batches-py/data_batch_1` .. `data_batch_5` and `test_batch`, and
//! `cifar-100-python/train` and `test`, were written by Python 2's `cPickle` with protocol 2.
//! Each holds one dict:
//!
//! - `data`: a numpy `uint8` array of shape `(N, 3072)`, each row one image as planar bytes (the
//!   1,024 red values, then the green, then the blue, each plane 32×32 row-major);
//! - CIFAR-10: `labels`, a list of N ints in `0..=9`; CIFAR-100: `coarse_labels` (`0..=19`) and
//!   `fine_labels` (`0..=99`), in that order in [`Records::labels`] (the order of
//!   [`Layout::label_fields`] and of the binary records);
//! - `batch_label` and `filenames` (strings), which are not read.
//!
//! A pickle is a program for a small stack machine: one-byte opcodes, some followed by
//! arguments. These files use `PROTO 2`, then `EMPTY_DICT` and `MARK` … `SETITEMS` for the dict;
//! `SHORT_BINSTRING`/`BINSTRING` for strings; `BININT1`/`BININT2`/`BININT` (or `LONG1`) for
//! ints; `EMPTY_LIST` and `MARK` … `APPENDS` (in batches of 1,000) or `APPEND` for lists;
//! `BINPUT`/`LONG_BINPUT` after nearly every object to record it in the memo, and
//! `BINGET`/`LONG_BINGET` to push a recorded object again. The array is what numpy's
//! `ndarray.__reduce__` returns, replayed:
//!
//! ```text
//! GLOBAL 'numpy.core.multiarray _reconstruct'       # the function that makes an empty array
//! (GLOBAL 'numpy ndarray', (0,), 'b')  REDUCE        # _reconstruct(ndarray, (0,), 'b')
//! (1, (N, 3072), dtype, False, '<N*3072 bytes>')  BUILD   # ndarray.__setstate__(state)
//! ```
//!
//! where `dtype` is `GLOBAL 'numpy dtype'` applied (`REDUCE`) to `('u1', 0, 1)`, then `BUILD`
//! with `(3, '|', None, None, None, -1, -1, 0)`. [`parse`] also reads what Python 3 writes with
//! protocols 3 and 4 (`BINBYTES`/`SHORT_BINBYTES` for the pixels, `BINUNICODE`/
//! `SHORT_BINUNICODE` strings, `FRAME`, `MEMOIZE`, `STACK_GLOBAL`, numpy 2's
//! `numpy._core.multiarray`). It does not read protocol 5, nor protocol 2 written by Python 3
//! (there the pixels are `_codecs.encode(<text>, 'latin1')`, which is not allowed).
//!
//! # Why it is written here
//!
//! Python's own unpickler *executes* the file: `GLOBAL` imports any module and `REDUCE` calls
//! any function, so a file can run `os.system`. This reader never executes anything: `GLOBAL`
//! only resolves three names (`_reconstruct`, `numpy.ndarray`, `numpy.dtype`) to inert markers,
//! `REDUCE` and `BUILD` only accept those markers with exactly the arguments numpy writes for a
//! `uint8` array, and every other opcode or name is an error that names the byte offset. No
//! Python runtime is involved.
//!
//! The `serde-pickle` crate (pure Rust, never executes code either) was considered; what
//! follows is from its documentation (1.x) and the source of its `de.rs` (a 2021 revision), not
//! from trying it on the files. With `DeOptions::replace_unresolved_globals` it keeps globals it
//! does not know, such as `_reconstruct`, as opaque values, and `BUILD` replaces the object with
//! its state, so it could read these files: `data` would come back as the state tuple
//! `(1, (N, 3072), <dtype state>, False, bytes)`. It was not used because, in the source read,
//! `REDUCE` on an unknown global drops the arguments, so the `'u1'` of the dtype is lost and an
//! `int8` array of the right shape (whose dtype state is the same) would pass (1.2's
//! `keep_restore_state` may keep more; not checked); because the pixels would be copied into an
//! owned `Vec<u8>` before the interleaving copy (here they are a range of the input, copied
//! once, into the interleaved [`Records`]); because its errors would not name the offending
//! construct in these terms; and because it would add `serde` and its other dependencies to a
//! file that the fuzz target includes with `std` only.
//!
//! # Robustness
//!
//! The input is untrusted. [`parse`] never panics; checks every length against the bytes left
//! before using it (a negative `BINSTRING` length is an error); keeps byte strings as ranges
//! into the input, so the pixels are copied once, when interleaved; keeps objects in an arena
//! referenced by index, so `BINGET` never clones and `APPENDS` extend the list in place; keeps
//! the memo in a hash map (a `LONG_BINPUT` index of 2³² − 1 costs one entry); never recurses
//! (the machine is a loop; nesting depth only costs stack entries); and creates at most
//! [`MAX_OBJECTS`] objects (48 MiB of them at most). Besides those and the returned
//! [`Records`], what it allocates is proportional to the input: at most one stack, memo or
//! container entry (8 to about 40 bytes) per input byte.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use super::cifar_format::{self, IMAGE_BYTES, Layout, Records};

/// The most objects (strings, ints, lists, …) one pickle may create: 1,048,576.
///
/// The real files need one per label and file name, and a few dozen more (CIFAR-100 `train`,
/// 50,000 images with two labels each: about 150,000); the limit only stops hostile input from
/// making the reader's bookkeeping large (each object takes 48 bytes).
pub const MAX_OBJECTS: usize = 1 << 20;

/// The dict keys holding the labels, in [`Layout::label_fields`] order.
///
/// CIFAR-10: `labels`; CIFAR-100: `coarse_labels`, then `fine_labels`.
pub fn label_keys(layout: Layout) -> &'static [&'static str] {
    match layout {
        Layout::Cifar10 => &["labels"],
        Layout::Cifar100 => &["coarse_labels", "fine_labels"],
    }
}

/// Why bytes are not a CIFAR pickle: where, and what is wrong.
///
/// Displays as `offset 1234: <reason>`; the caller adds the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    offset: Option<usize>,
    reason: String,
}

impl PickleError {
    fn at(offset: usize, reason: impl Into<String>) -> Self {
        PickleError {
            offset: Some(offset),
            reason: reason.into(),
        }
    }

    /// The byte offset in the input where the problem was found: the opcode at fault, the
    /// object at fault (the opcode that created it), or the input length for input that ends
    /// too early. Never beyond the input length. Every error [`parse`] returns has one.
    pub fn offset(&self) -> Option<usize> {
        self.offset
    }

    /// What is wrong, in words, without the offset.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset() {
            Some(offset) => write!(f, "offset {offset}: {}", self.reason()),
            None => f.write_str(self.reason()),
        }
    }
}

impl std::error::Error for PickleError {}

/// Parses `bytes`, one file of the python version of CIFAR-10 or CIFAR-100 (per `layout`), into
/// the same [`Records`] [`cifar_format::parse`] returns for the binary version.
///
/// Errors ([`PickleError`], with the byte offset): not a pickle of protocol 2 to 4; an opcode
/// other than those listed in the module documentation; a `GLOBAL` other than numpy's
/// `_reconstruct`, `ndarray` and `dtype`; a dtype other than `u1`; a Fortran-order array; input
/// that ends early or goes on after `STOP`; a top-level object that is not a dict; a missing
/// key; `data` not of shape `(N, 3072)` with N ≥ 1, or with a byte count other than N × 3072; a
/// label list whose length is not N; a label that is not an int in range.
pub fn parse(bytes: &[u8], layout: Layout) -> Result<Records, PickleError> {
    let machine = Machine::run(bytes, MAX_OBJECTS)?;
    machine.records(layout)
}

/// Opcodes: the names and values of Python's `pickle.py`.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const READONLY_BUFFER: u8 = 0x98;

    /// The opcode's name, or `None` for a byte that is no opcode.
    pub fn name(code: u8) -> Option<&'static str> {
        Some(match code {
            MARK => "MARK",
            STOP => "STOP",
            POP => "POP",
            POP_MARK => "POP_MARK",
            DUP => "DUP",
            FLOAT => "FLOAT",
            INT => "INT",
            BININT => "BININT",
            BININT1 => "BININT1",
            LONG => "LONG",
            BININT2 => "BININT2",
            NONE => "NONE",
            PERSID => "PERSID",
            BINPERSID => "BINPERSID",
            REDUCE => "REDUCE",
            STRING => "STRING",
            BINSTRING => "BINSTRING",
            SHORT_BINSTRING => "SHORT_BINSTRING",
            UNICODE => "UNICODE",
            BINUNICODE => "BINUNICODE",
            APPEND => "APPEND",
            BUILD => "BUILD",
            GLOBAL => "GLOBAL",
            DICT => "DICT",
            EMPTY_DICT => "EMPTY_DICT",
            APPENDS => "APPENDS",
            GET => "GET",
            BINGET => "BINGET",
            INST => "INST",
            LONG_BINGET => "LONG_BINGET",
            LIST => "LIST",
            EMPTY_LIST => "EMPTY_LIST",
            OBJ => "OBJ",
            PUT => "PUT",
            BINPUT => "BINPUT",
            LONG_BINPUT => "LONG_BINPUT",
            SETITEM => "SETITEM",
            TUPLE => "TUPLE",
            EMPTY_TUPLE => "EMPTY_TUPLE",
            SETITEMS => "SETITEMS",
            BINFLOAT => "BINFLOAT",
            PROTO => "PROTO",
            NEWOBJ => "NEWOBJ",
            EXT1 => "EXT1",
            EXT2 => "EXT2",
            EXT4 => "EXT4",
            TUPLE1 => "TUPLE1",
            TUPLE2 => "TUPLE2",
            TUPLE3 => "TUPLE3",
            NEWTRUE => "NEWTRUE",
            NEWFALSE => "NEWFALSE",
            LONG1 => "LONG1",
            LONG4 => "LONG4",
            BINBYTES => "BINBYTES",
            SHORT_BINBYTES => "SHORT_BINBYTES",
            SHORT_BINUNICODE => "SHORT_BINUNICODE",
            BINUNICODE8 => "BINUNICODE8",
            BINBYTES8 => "BINBYTES8",
            EMPTY_SET => "EMPTY_SET",
            ADDITEMS => "ADDITEMS",
            FROZENSET => "FROZENSET",
            NEWOBJ_EX => "NEWOBJ_EX",
            STACK_GLOBAL => "STACK_GLOBAL",
            MEMOIZE => "MEMOIZE",
            FRAME => "FRAME",
            BYTEARRAY8 => "BYTEARRAY8",
            NEXT_BUFFER => "NEXT_BUFFER",
            READONLY_BUFFER => "READONLY_BUFFER",
            _ => return None,
        })
    }
}

/// Index of an object in [`Machine::nodes`].
type Id = usize;

/// Which opcode family made a string; Python 3 treats them differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrKind {
    /// `SHORT_BINSTRING`/`BINSTRING`: Python 2 `str` (Python 3 reads it as text or bytes, as
    /// asked).
    Py2,
    /// `SHORT_BINBYTES`/`BINBYTES`: Python 3 `bytes`.
    Bytes,
    /// `SHORT_BINUNICODE`/`BINUNICODE`: text, UTF-8 encoded.
    Text,
}

/// The names `GLOBAL` may resolve: markers, never code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    /// `numpy.core.multiarray._reconstruct` (numpy 2: `numpy._core.multiarray`).
    Reconstruct,
    /// `numpy.ndarray`.
    NdArray,
    /// `numpy.dtype`.
    Dtype,
}

impl Global {
    fn resolve(module: &[u8], name: &[u8]) -> Option<Global> {
        match (module, name) {
            (b"numpy.core.multiarray" | b"numpy._core.multiarray", b"_reconstruct") => {
                Some(Global::Reconstruct)
            }
            (b"numpy", b"ndarray") => Some(Global::NdArray),
            (b"numpy", b"dtype") => Some(Global::Dtype),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Global::Reconstruct => "numpy.core.multiarray _reconstruct",
            Global::NdArray => "numpy ndarray",
            Global::Dtype => "numpy dtype",
        }
    }
}

/// An object on the machine's stack, in its memo or inside another object.
#[derive(Debug)]
enum Object {
    None,
    Bool(bool),
    Int(i64),
    /// A string: where its bytes are in the input.
    Str(StrKind, Range<usize>),
    Tuple(Box<[Id]>),
    List(Vec<Id>),
    /// Key–value pairs in insertion order; a later equal key wins, as in Python.
    Dict(Vec<(Id, Id)>),
    Global(Global),
    /// `numpy.dtype('u1', ...)`, before (`built: false`) or after its `BUILD`.
    Dtype {
        built: bool,
    },
    /// `_reconstruct(ndarray, (0,), 'b')`, before its `BUILD`.
    EmptyArray,
    /// A `uint8` array after its `BUILD`: its shape and where its bytes are in the input.
    Array {
        shape: Box<[usize]>,
        data: Range<usize>,
    },
}

/// An object and the offset of the opcode that created it.
#[derive(Debug)]
struct Node {
    at: usize,
    object: Object,
}

/// What one item of a state tuple must be.
#[derive(Clone, Copy)]
enum Expect {
    None,
    Int(i64),
    Str(&'static [u8]),
}

/// The pickle machine: the input, the objects, the stack, the marks and the memo.
struct Machine<'a> {
    input: &'a [u8],
    /// Next byte to read.
    pos: usize,
    /// Offset of the opcode being run.
    at: usize,
    max_objects: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack lengths at each open `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    /// The object `STOP` returned.
    root: Id,
}

/// Shortens `bytes` for a message: at most 48 bytes, escaped.
fn preview(bytes: &[u8]) -> String {
    const MAX: usize = 48;
    let shown = &bytes[..bytes.len().min(MAX)];
    let text: String = String::from_utf8_lossy(shown).escape_debug().collect();
    if bytes.len() > MAX {
        format!("{text}… ({} bytes)", bytes.len())
    } else {
        text
    }
}

/// `(a, b, c)` for a shape, shortened after 8 entries.
fn shape_text(shape: &[usize]) -> String {
    let mut parts: Vec<String> = shape.iter().take(8).map(|d| d.to_string()).collect();
    if shape.len() > 8 {
        parts.push(format!("… {} dimensions", shape.len()));
    }
    if shape.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

fn opcode_text(code: u8) -> String {
    match op::name(code) {
        Some(name) => format!("opcode 0x{code:02x} {name}"),
        None => format!("byte 0x{code:02x}"),
    }
}

impl<'a> Machine<'a> {
    /// Runs the pickle in `input` to its `STOP`.
    fn run(input: &'a [u8], max_objects: usize) -> Result<Self, PickleError> {
        let mut machine = Machine {
            input,
            pos: 0,
            at: 0,
            max_objects,
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            root: 0,
        };
        machine.proto()?;
        loop {
            machine.at = machine.pos;
            let Some(&code) = input.get(machine.pos) else {
                return Err(PickleError::at(
                    input.len(),
                    "truncated: the pickle ends without STOP",
                ));
            };
            machine.pos += 1;
            if code == op::STOP {
                machine.stop()?;
                return Ok(machine);
            }
            machine.step(code)?;
        }
    }

    fn proto(&mut self) -> Result<(), PickleError> {
        match *self.input {
            [op::PROTO, 2..=4, ..] => {
                self.pos = 2;
                Ok(())
            }
            [op::PROTO, version, ..] => Err(PickleError::at(
                0,
                format!("pickle protocol {version} is not supported (only 2, 3 and 4)"),
            )),
            ref start => {
                let found = match start {
                    [] => "the input is empty".to_string(),
                    [a] => format!("found 0x{a:02x}"),
                    [a, b, ..] => format!("found 0x{a:02x} 0x{b:02x}"),
                };
                Err(PickleError::at(
                    0,
                    format!("not a pickle: expected PROTO 2 (0x80 0x02), {found}"),
                ))
            }
        }
    }

    fn stop(&mut self) -> Result<(), PickleError> {
        if !self.marks.is_empty() {
            return Err(self.error(format!("STOP with {} MARK(s) still open", self.marks.len())));
        }
        let [root] = self.stack[..] else {
            return Err(self.error(format!(
                "STOP with {} objects on the stack, expected 1",
                self.stack.len()
            )));
        };
        self.root = root;
        if self.pos != self.input.len() {
            return Err(PickleError::at(
                self.pos,
                format!("{} trailing bytes after STOP", self.input.len() - self.pos),
            ));
        }
        Ok(())
    }

    /// Runs one opcode (not `STOP`) whose byte was just read.
    fn step(&mut self, code: u8) -> Result<(), PickleError> {
        match code {
            op::MARK => self.marks.push(self.stack.len()),
            op::FRAME => {
                // Framing (protocol 4) only groups opcodes for buffered reading: skip the size.
                let size = u64::from_le_bytes(self.array("FRAME")?);
                let left = self.input.len() - self.pos;
                if usize::try_from(size).map_or(true, |size| size > left) {
                    return Err(self.error(format!(
                        "truncated: FRAME announces {size} bytes, {left} left"
                    )));
                }
            }

            // Memo.
            op::BINPUT => {
                let [index] = self.array("BINPUT")?;
                self.put(u32::from(index), "BINPUT")?;
            }
            op::LONG_BINPUT => {
                let index = u32::from_le_bytes(self.array("LONG_BINPUT")?);
                self.put(index, "LONG_BINPUT")?;
            }
            op::MEMOIZE => {
                let index = u32::try_from(self.memo.len())
                    .map_err(|_| self.error("MEMOIZE: the memo is full"))?;
                self.put(index, "MEMOIZE")?;
            }
            op::BINGET => {
                let [index] = self.array("BINGET")?;
                self.get(u32::from(index), "BINGET")?;
            }
            op::LONG_BINGET => {
                let index = u32::from_le_bytes(self.array("LONG_BINGET")?);
                self.get(index, "LONG_BINGET")?;
            }

            // Constants and ints.
            op::NONE => self.push(Object::None)?,
            op::NEWTRUE => self.push(Object::Bool(true))?,
            op::NEWFALSE => self.push(Object::Bool(false))?,
            op::BININT1 => {
                let [value] = self.array("BININT1")?;
                self.push(Object::Int(i64::from(value)))?;
            }
            op::BININT2 => {
                let value = u16::from_le_bytes(self.array("BININT2")?);
                self.push(Object::Int(i64::from(value)))?;
            }
            op::BININT => {
                let value = i32::from_le_bytes(self.array("BININT")?);
                self.push(Object::Int(i64::from(value)))?;
            }
            op::LONG1 => {
                let [len] = self.array("LONG1")?;
                let bytes = self.take(usize::from(len), "LONG1")?;
                if len > 8 {
                    return Err(self.error(format!("LONG1 of {len} bytes does not fit 64 bits")));
                }
                // Little-endian two's complement; an empty one is 0.
                let bytes = &self.input[bytes];
                let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
                let mut full = [if negative { 0xff } else { 0 }; 8];
                full[..bytes.len()].copy_from_slice(bytes);
                self.push(Object::Int(i64::from_le_bytes(full)))?;
            }

            // Strings.
            op::SHORT_BINSTRING => {
                let [len] = self.array("SHORT_BINSTRING")?;
                self.string(StrKind::Py2, usize::from(len), "SHORT_BINSTRING")?;
            }
            op::BINSTRING => {
                let len = i32::from_le_bytes(self.array("BINSTRING")?);
                let Ok(len) = usize::try_from(len) else {
                    return Err(self.error(format!("BINSTRING length {len} is negative")));
                };
                self.string(StrKind::Py2, len, "BINSTRING")?;
            }
            op::SHORT_BINBYTES => {
                let [len] = self.array("SHORT_BINBYTES")?;
                self.string(StrKind::Bytes, usize::from(len), "SHORT_BINBYTES")?;
            }
            op::BINBYTES => {
                let len = u32::from_le_bytes(self.array("BINBYTES")?);
                self.string(StrKind::Bytes, len as usize, "BINBYTES")?;
            }
            op::SHORT_BINUNICODE => {
                let [len] = self.array("SHORT_BINUNICODE")?;
                self.string(StrKind::Text, usize::from(len), "SHORT_BINUNICODE")?;
            }
            op::BINUNICODE => {
                let len = u32::from_le_bytes(self.array("BINUNICODE")?);
                self.string(StrKind::Text, len as usize, "BINUNICODE")?;
            }

            // Tuples.
            op::EMPTY_TUPLE => self.push(Object::Tuple(Box::new([])))?,
            op::TUPLE1 => {
                let a = self.pop("TUPLE1")?;
                self.push(Object::Tuple(Box::new([a])))?;
            }
            op::TUPLE2 => {
                let b = self.pop("TUPLE2")?;
                let a = self.pop("TUPLE2")?;
                self.push(Object::Tuple(Box::new([a, b])))?;
            }
            op::TUPLE3 => {
                let c = self.pop("TUPLE3")?;
                let b = self.pop("TUPLE3")?;
                let a = self.pop("TUPLE3")?;
                self.push(Object::Tuple(Box::new([a, b, c])))?;
            }
            op::TUPLE => {
                let items = self.pop_mark("TUPLE")?;
                self.push(Object::Tuple(items.into_boxed_slice()))?;
            }

            // Lists.
            op::EMPTY_LIST => self.push(Object::List(Vec::new()))?,
            op::APPEND => {
                let item = self.pop("APPEND")?;
                self.append([item], "APPEND")?;
            }
            op::APPENDS => {
                let items = self.pop_mark("APPENDS")?;
                self.append(items, "APPENDS")?;
            }

            // Dicts.
            op::EMPTY_DICT => self.push(Object::Dict(Vec::new()))?,
            op::SETITEM => {
                let value = self.pop("SETITEM")?;
                let key = self.pop("SETITEM")?;
                self.set_items(&[key, value], "SETITEM")?;
            }
            op::SETITEMS => {
                let items = self.pop_mark("SETITEMS")?;
                if items.len() % 2 != 0 {
                    return Err(self.error(format!(
                        "SETITEMS with {} objects after its MARK: not key-value pairs",
                        items.len()
                    )));
                }
                self.set_items(&items, "SETITEMS")?;
            }

            // Globals, calls and state.
            op::GLOBAL => {
                let module = self.line("GLOBAL module name")?;
                let name = self.line("GLOBAL name")?;
                let (module, name) = (&self.input[module], &self.input[name]);
                let global = self.global(module, name, "GLOBAL")?;
                self.push(Object::Global(global))?;
            }
            op::STACK_GLOBAL => {
                let name = self.pop("STACK_GLOBAL")?;
                let module = self.pop("STACK_GLOBAL")?;
                let (Some(module), Some(name)) = (self.text(module), self.text(name)) else {
                    return Err(self.error(format!(
                        "STACK_GLOBAL needs two strings, found {} and {}",
                        self.describe(module),
                        self.describe(name)
                    )));
                };
                let global = self.global(module, name, "STACK_GLOBAL")?;
                self.push(Object::Global(global))?;
            }
            op::REDUCE => {
                let args = self.pop("REDUCE")?;
                let callable = self.pop("REDUCE")?;
                let object = self.reduce(callable, args)?;
                self.push(object)?;
            }
            op::BUILD => {
                let state = self.pop("BUILD")?;
                let target = self.top("BUILD")?;
                let object = self.build(target, state)?;
                self.nodes[target].object = object;
            }

            op::PROTO => return Err(self.error("PROTO is only allowed at the start")),
            _ => {
                return Err(self.error(match op::name(code) {
                    Some(_) => format!("{} is not supported", opcode_text(code)),
                    None => format!("{} is not a pickle opcode", opcode_text(code)),
                }));
            }
        }
        Ok(())
    }

    fn error(&self, reason: impl Into<String>) -> PickleError {
        PickleError::at(self.at, reason)
    }

    /// The next `n` bytes, as a range of the input.
    fn take(&mut self, n: usize, what: &str) -> Result<Range<usize>, PickleError> {
        let left = self.input.len() - self.pos;
        if n > left {
            return Err(self.error(format!("truncated: {what} needs {n} bytes, {left} left")));
        }
        let range = self.pos..self.pos + n;
        self.pos += n;
        Ok(range)
    }

    /// The next `N` bytes.
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], PickleError> {
        let range = self.take(N, what)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.input[range]);
        Ok(out)
    }

    /// The bytes up to the next newline, which is skipped.
    fn line(&mut self, what: &str) -> Result<Range<usize>, PickleError> {
        let rest = &self.input[self.pos..];
        let Some(len) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.error(format!(
                "truncated: {what} has no newline ({} bytes left)",
                rest.len()
            )));
        };
        let range = self.pos..self.pos + len;
        self.pos += len + 1;
        Ok(range)
    }

    fn node(&mut self, object: Object) -> Result<Id, PickleError> {
        if self.nodes.len() >= self.max_objects {
            return Err(self.error(format!(
                "more than {} objects: too many for a CIFAR file",
                self.max_objects
            )));
        }
        self.nodes.push(Node {
            at: self.at,
            object,
        });
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, object: Object) -> Result<(), PickleError> {
        let id = self.node(object)?;
        self.stack.push(id);
        Ok(())
    }

    /// The stack length below which the innermost open `MARK` hides the stack.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn underflow(&self, what: &str) -> PickleError {
        let place = if self.marks.is_empty() {
            "the stack is empty"
        } else {
            "nothing above the MARK"
        };
        self.error(format!("{what} needs an object but {place}"))
    }

    fn pop(&mut self, what: &str) -> Result<Id, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.underflow(what));
        }
        self.stack.pop().ok_or_else(|| self.underflow(what))
    }

    fn top(&self, what: &str) -> Result<Id, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.underflow(what));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.underflow(what))
    }

    /// Closes the innermost `MARK`: the objects above it, in order.
    fn pop_mark(&mut self, what: &str) -> Result<Vec<Id>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.error(format!("{what} without a MARK")));
        };
        // Pops never go below the innermost mark, so `mark <= len`; `min` keeps it so anyway.
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn put(&mut self, index: u32, what: &str) -> Result<(), PickleError> {
        let top = self.top(what)?;
        self.memo.insert(index, top);
        Ok(())
    }

    fn get(&mut self, index: u32, what: &str) -> Result<(), PickleError> {
        let Some(&id) = self.memo.get(&index) else {
            return Err(self.error(format!("{what} {index}: nothing memoized under that index")));
        };
        self.stack.push(id);
        Ok(())
    }

    fn string(&mut self, kind: StrKind, len: usize, what: &str) -> Result<(), PickleError> {
        let range = self.take(len, what)?;
        self.push(Object::Str(kind, range))
    }

    /// Appends `items` to the list on top of the stack.
    fn append(
        &mut self,
        items: impl IntoIterator<Item = Id>,
        what: &str,
    ) -> Result<(), PickleError> {
        let list = self.top(what)?;
        match &mut self.nodes[list].object {
            Object::List(list) => {
                list.extend(items);
                Ok(())
            }
            _ => Err(self.error(format!(
                "{what} to {}: only lists are allowed",
                self.describe(list)
            ))),
        }
    }

    /// Adds `pairs` (key, value, key, value, …) to the dict on top of the stack.
    fn set_items(&mut self, pairs: &[Id], what: &str) -> Result<(), PickleError> {
        for &key in pairs.iter().step_by(2) {
            if matches!(
                self.obj(key),
                Object::List(_) | Object::Dict(_) | Object::EmptyArray | Object::Array { .. }
            ) {
                return Err(self.error(format!(
                    "{what}: {} cannot be a dict key",
                    self.describe(key)
                )));
            }
        }
        let dict = self.top(what)?;
        match &mut self.nodes[dict].object {
            Object::Dict(items) => {
                items.extend(pairs.chunks_exact(2).map(|pair| (pair[0], pair[1])));
                Ok(())
            }
            _ => Err(self.error(format!(
                "{what} on {}: only dicts are allowed",
                self.describe(dict)
            ))),
        }
    }

    fn global(&self, module: &[u8], name: &[u8], what: &str) -> Result<Global, PickleError> {
        Global::resolve(module, name).ok_or_else(|| {
            let code = if what == "GLOBAL" {
                op::GLOBAL
            } else {
                op::STACK_GLOBAL
            };
            self.error(format!(
                "{} `{} {}` is not allowed (only numpy's `_reconstruct`, `ndarray` and `dtype`)",
                opcode_text(code),
                preview(module),
                preview(name)
            ))
        })
    }

    fn obj(&self, id: Id) -> &Object {
        &self.nodes[id].object
    }

    /// The bytes of a string that Python 3 reads as text (not `bytes`).
    fn text(&self, id: Id) -> Option<&'a [u8]> {
        match self.obj(id) {
            Object::Str(StrKind::Py2 | StrKind::Text, range) => Some(&self.input[range.clone()]),
            _ => None,
        }
    }

    /// The bytes of any string.
    fn any_str(&self, id: Id) -> Option<&'a [u8]> {
        match self.obj(id) {
            Object::Str(_, range) => Some(&self.input[range.clone()]),
            _ => None,
        }
    }

    /// A short description of an object for messages.
    fn describe(&self, id: Id) -> String {
        match self.obj(id) {
            Object::None => "None".into(),
            Object::Bool(true) => "True".into(),
            Object::Bool(false) => "False".into(),
            Object::Int(value) => format!("int {value}"),
            Object::Str(kind, range) => {
                let kind = match kind {
                    StrKind::Py2 => "string",
                    StrKind::Bytes => "bytes",
                    StrKind::Text => "text",
                };
                format!("{kind} `{}`", preview(&self.input[range.clone()]))
            }
            Object::Tuple(items) => format!("a tuple of {}", items.len()),
            Object::List(items) => format!("a list of {}", items.len()),
            Object::Dict(items) => format!("a dict of {} items", items.len()),
            Object::Global(global) => format!("`{}`", global.name()),
            Object::Dtype { .. } => "a numpy dtype".into(),
            Object::EmptyArray => "a numpy array without state".into(),
            Object::Array { shape, .. } => format!("a numpy array of shape {}", shape_text(shape)),
        }
    }

    fn tuple(&self, id: Id) -> Option<&[Id]> {
        match self.obj(id) {
            Object::Tuple(items) => Some(items),
            _ => None,
        }
    }

    fn is(&self, id: Id, expect: Expect) -> bool {
        match (self.obj(id), expect) {
            (Object::None, Expect::None) => true,
            (&Object::Int(value), Expect::Int(want)) => value == want,
            (Object::Str(_, range), Expect::Str(want)) => &self.input[range.clone()] == want,
            _ => false,
        }
    }

    /// Checks `items` against `expect`, item by item; `what` names the tuple.
    fn check_items(&self, items: &[Id], expect: &[Expect], what: &str) -> Result<(), PickleError> {
        if items.len() != expect.len() {
            return Err(self.error(format!(
                "{what} has {} items, expected {}",
                items.len(),
                expect.len()
            )));
        }
        for (index, (&item, &want)) in items.iter().zip(expect).enumerate() {
            if !self.is(item, want) {
                let want = match want {
                    Expect::None => "None".to_string(),
                    Expect::Int(value) => format!("int {value}"),
                    Expect::Str(text) => format!("string `{}`", preview(text)),
                };
                return Err(self.error(format!(
                    "{what}: item {index} is {}, expected {want}",
                    self.describe(item)
                )));
            }
        }
        Ok(())
    }

    /// `REDUCE`: only numpy's `_reconstruct` and `dtype`, with the arguments numpy writes.
    fn reduce(&self, callable: Id, args: Id) -> Result<Object, PickleError> {
        let Object::Global(global) = *self.obj(callable) else {
            return Err(self.error(format!(
                "REDUCE calls {}: only numpy's `_reconstruct` and `dtype` are allowed",
                self.describe(callable)
            )));
        };
        let Some(args) = self.tuple(args) else {
            return Err(self.error(format!(
                "REDUCE arguments are {}, expected a tuple",
                self.describe(args)
            )));
        };
        match global {
            Global::Reconstruct => {
                // ndarray.__reduce__: _reconstruct(ndarray, (0,), b'b').
                let [class, shape, code] = *args else {
                    return Err(self.error(format!(
                        "`_reconstruct` with {} arguments, expected 3",
                        args.len()
                    )));
                };
                if !matches!(self.obj(class), Object::Global(Global::NdArray)) {
                    return Err(self.error(format!(
                        "`_reconstruct` of {}: only `numpy ndarray` is allowed",
                        self.describe(class)
                    )));
                }
                match self.tuple(shape) {
                    Some(items) => {
                        self.check_items(items, &[Expect::Int(0)], "`_reconstruct` shape")?
                    }
                    None => {
                        return Err(self.error(format!(
                            "`_reconstruct` shape is {}, expected (0,)",
                            self.describe(shape)
                        )));
                    }
                }
                self.check_items(&[code], &[Expect::Str(b"b")], "`_reconstruct` type code")?;
                Ok(Object::EmptyArray)
            }
            Global::Dtype => {
                // dtype.__reduce__: dtype('u1', 0, 1) (numpy 2: False, True).
                let [name, align, copy] = *args else {
                    return Err(self.error(format!(
                        "`numpy dtype` with {} arguments, expected 3",
                        args.len()
                    )));
                };
                let Some(name) = self.any_str(name) else {
                    return Err(self.error(format!(
                        "dtype name is {}, expected a string",
                        self.describe(name)
                    )));
                };
                if name != b"u1" {
                    return Err(self.error(format!(
                        "dtype `{}` is not allowed: the pixels must be `u1` (uint8)",
                        preview(name)
                    )));
                }
                for flag in [align, copy] {
                    if !matches!(self.obj(flag), Object::Int(0 | 1) | Object::Bool(_)) {
                        return Err(self.error(format!(
                            "dtype flag is {}, expected 0, 1, False or True",
                            self.describe(flag)
                        )));
                    }
                }
                Ok(Object::Dtype { built: false })
            }
            Global::NdArray => Err(self.error(
                "REDUCE calls `numpy ndarray`: only `_reconstruct` and `dtype` are allowed",
            )),
        }
    }

    /// `BUILD`: only the state numpy writes for a `u1` dtype and a C-order `u1` array.
    fn build(&self, target: Id, state: Id) -> Result<Object, PickleError> {
        let Some(items) = self.tuple(state) else {
            return Err(self.error(format!(
                "BUILD state is {}, expected a tuple",
                self.describe(state)
            )));
        };
        match self.obj(target) {
            Object::Dtype { built: false } => {
                // (version, byte order, subarray, names, fields, item size, alignment, flags).
                self.check_items(
                    items,
                    &[
                        Expect::Int(3),
                        Expect::Str(b"|"),
                        Expect::None,
                        Expect::None,
                        Expect::None,
                        Expect::Int(-1),
                        Expect::Int(-1),
                        Expect::Int(0),
                    ],
                    "dtype state",
                )?;
                Ok(Object::Dtype { built: true })
            }
            Object::EmptyArray => {
                // (version, shape, dtype, Fortran order, data).
                let [version, shape, dtype, fortran, data] = *items else {
                    return Err(
                        self.error(format!("array state has {} items, expected 5", items.len()))
                    );
                };
                self.check_items(&[version], &[Expect::Int(1)], "array state version")?;
                let Some(dims) = self.tuple(shape) else {
                    return Err(self.error(format!(
                        "array shape is {}, expected a tuple",
                        self.describe(shape)
                    )));
                };
                let mut shape = Vec::with_capacity(dims.len());
                for &dim in dims {
                    match *self.obj(dim) {
                        Object::Int(value) if value >= 0 => {
                            shape.push(usize::try_from(value).unwrap_or(usize::MAX));
                        }
                        _ => {
                            return Err(self.error(format!(
                                "array shape holds {}, expected ints ≥ 0",
                                self.describe(dim)
                            )));
                        }
                    }
                }
                if !matches!(self.obj(dtype), Object::Dtype { .. }) {
                    return Err(self.error(format!(
                        "array dtype is {}, expected a numpy dtype",
                        self.describe(dtype)
                    )));
                }
                match self.obj(fortran) {
                    Object::Bool(false) | Object::Int(0) => {}
                    Object::Bool(true) | Object::Int(1) => {
                        return Err(self.error("Fortran-order arrays are not supported"));
                    }
                    _ => {
                        return Err(self.error(format!(
                            "array Fortran flag is {}, expected False",
                            self.describe(fortran)
                        )));
                    }
                }
                let data = match self.obj(data) {
                    Object::Str(StrKind::Py2 | StrKind::Bytes, range) => range.clone(),
                    _ => {
                        return Err(self.error(format!(
                            "array data is {}, expected a byte string",
                            self.describe(data)
                        )));
                    }
                };
                let needed = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                if needed != Some(data.len()) {
                    let needed =
                        needed.map_or("more than fits in memory".to_string(), |n| format!("{n}"));
                    return Err(self.error(format!(
                        "array data has {} bytes but shape {} needs {needed}",
                        data.len(),
                        shape_text(&shape)
                    )));
                }
                Ok(Object::Array {
                    shape: shape.into_boxed_slice(),
                    data,
                })
            }
            _ => Err(self.error(format!(
                "BUILD on {}: only a numpy dtype or array (once) is allowed",
                self.describe(target)
            ))),
        }
    }

    /// The records of the dict `STOP` returned.
    fn records(&self, layout: Layout) -> Result<Records, PickleError> {
        let root_at = self.nodes[self.root].at;
        let Object::Dict(pairs) = self.obj(self.root) else {
            return Err(PickleError::at(
                root_at,
                format!(
                    "the pickle holds {}, expected a dict",
                    self.describe(self.root)
                ),
            ));
        };
        let find = |key: &str| -> Result<Id, PickleError> {
            // A later equal key wins, as in Python. `bytes` keys differ from text in Python 3.
            match pairs
                .iter()
                .rev()
                .find(|&&(k, _)| self.text(k) == Some(key.as_bytes()))
            {
                Some(&(_, value)) => Ok(value),
                None => Err(PickleError::at(root_at, self.missing(pairs, key, layout))),
            }
        };

        let data = find("data")?;
        let data_at = self.nodes[data].at;
        let (count, range) = match self.obj(data) {
            Object::Array { shape, data } => match **shape {
                [count, IMAGE_BYTES] if count > 0 => (count, data.clone()),
                _ => {
                    return Err(PickleError::at(
                        data_at,
                        format!(
                            "key `data`: shape {} is not (N, {IMAGE_BYTES}) with N ≥ 1",
                            shape_text(shape)
                        ),
                    ));
                }
            },
            _ => {
                return Err(PickleError::at(
                    data_at,
                    format!(
                        "key `data`: {}, expected a numpy array",
                        self.describe(data)
                    ),
                ));
            }
        };

        let fields = layout.label_fields();
        let mut labels = vec![0u8; count * fields.len()];
        for (f, (field, &key)) in fields.iter().zip(label_keys(layout)).enumerate() {
            let list = find(key)?;
            let list_at = self.nodes[list].at;
            let Object::List(items) = self.obj(list) else {
                return Err(PickleError::at(
                    list_at,
                    format!(
                        "key `{key}`: {}, expected a list of ints",
                        self.describe(list)
                    ),
                ));
            };
            if items.len() != count {
                return Err(PickleError::at(
                    list_at,
                    format!(
                        "key `{key}`: {} labels but `data` has {count} images",
                        items.len()
                    ),
                ));
            }
            for (index, &item) in items.iter().enumerate() {
                let item_at = self.nodes[item].at;
                let Object::Int(value) = *self.obj(item) else {
                    return Err(PickleError::at(
                        item_at,
                        format!(
                            "key `{key}`: label {index} is {}, expected an int",
                            self.describe(item)
                        ),
                    ));
                };
                match u8::try_from(value) {
                    Ok(value) if value < field.classes => labels[index * fields.len() + f] = value,
                    _ => {
                        return Err(PickleError::at(
                            item_at,
                            format!(
                                "key `{key}`: label {index} is {value}, out of range 0..={}",
                                field.classes - 1
                            ),
                        ));
                    }
                }
            }
        }
        cifar_format::from_planar(layout, labels, &self.input[range])
            .map_err(|e| PickleError::at(data_at, format!("key `data`: {e}")))
    }

    /// The message for a missing key: the keys there are and, when they fit the other layout,
    /// a hint.
    fn missing(&self, pairs: &[(Id, Id)], key: &str, layout: Layout) -> String {
        let keys: Vec<String> = pairs
            .iter()
            .take(8)
            .map(|&(k, _)| match self.text(k) {
                Some(text) => format!("`{}`", preview(text)),
                None => self.describe(k),
            })
            .collect();
        let more = if pairs.len() > 8 { ", …" } else { "" };
        let has = |name: &str| {
            pairs
                .iter()
                .any(|&(k, _)| self.text(k) == Some(name.as_bytes()))
        };
        let hint = match layout {
            Layout::Cifar10 if has("fine_labels") => "; this looks like a CIFAR-100 file",
            Layout::Cifar100 if has("labels") => "; this looks like a CIFAR-10 file",
            _ => "",
        };
        format!(
            "the dict has no key `{key}` (its keys: {}{more}){hint}",
            keys.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (a 64-bit LCG's high bytes).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect()
    }

    /// Emits pickle opcodes the way Python 2's cPickle (protocol 2) lays them out, or, with
    /// `proto4`, the way Python 3 does with protocol 4 (`MEMOIZE`, `SHORT_BINUNICODE`,
    /// `STACK_GLOBAL`, `BINBYTES`, a `FRAME`).
    struct Pickler {
        bytes: Vec<u8>,
        memo: u32,
        proto4: bool,
    }

    impl Pickler {
        fn new() -> Self {
            Pickler {
                bytes: vec![op::PROTO, 2],
                memo: 0,
                proto4: false,
            }
        }

        fn new4() -> Self {
            let mut bytes = vec![op::PROTO, 4, op::FRAME];
            bytes.extend(0u64.to_le_bytes()); // patched by `stop`
            Pickler {
                bytes,
                memo: 0,
                proto4: true,
            }
        }

        fn op(&mut self, code: u8) -> &mut Self {
            self.bytes.push(code);
            self
        }

        fn raw(&mut self, bytes: &[u8]) -> &mut Self {
            self.bytes.extend_from_slice(bytes);
            self
        }

        /// Memoizes the stack top, as cPickle does after nearly every object.
        fn put(&mut self) -> &mut Self {
            if self.proto4 {
                self.op(op::MEMOIZE);
            } else if self.memo < 256 {
                self.bytes.extend([op::BINPUT, self.memo as u8]);
            } else {
                self.op(op::LONG_BINPUT);
                self.bytes.extend(self.memo.to_le_bytes());
            }
            self.memo += 1;
            self
        }

        fn int(&mut self, value: i64) -> &mut Self {
            match value {
                0..=0xff => self.raw(&[op::BININT1, value as u8]),
                0x100..=0xffff => self.op(op::BININT2).raw(&(value as u16).to_le_bytes()),
                _ => match i32::try_from(value) {
                    Ok(v) => self.op(op::BININT).raw(&v.to_le_bytes()),
                    Err(_) => self.raw(&[op::LONG1, 8]).raw(&value.to_le_bytes()),
                },
            }
        }

        /// A text string: cPickle's `str`, or protocol 4's `SHORT_BINUNICODE`.
        fn str(&mut self, text: &[u8]) -> &mut Self {
            if self.proto4 {
                assert!(text.len() < 256);
                self.raw(&[op::SHORT_BINUNICODE, text.len() as u8])
                    .raw(text);
            } else if text.len() < 256 {
                self.raw(&[op::SHORT_BINSTRING, text.len() as u8]).raw(text);
            } else {
                self.op(op::BINSTRING)
                    .raw(&(text.len() as i32).to_le_bytes())
                    .raw(text);
            }
            self.put()
        }

        /// A byte string: cPickle's `str`, or protocol 4's `SHORT_BINBYTES`/`BINBYTES`.
        fn bytes(&mut self, data: &[u8]) -> &mut Self {
            if !self.proto4 {
                return self.str(data);
            }
            if data.len() < 256 {
                self.raw(&[op::SHORT_BINBYTES, data.len() as u8]).raw(data);
            } else {
                self.op(op::BINBYTES)
                    .raw(&(data.len() as u32).to_le_bytes())
                    .raw(data);
            }
            self.put()
        }

        fn global(&mut self, module: &[u8], name: &[u8]) -> &mut Self {
            if self.proto4 {
                self.str(module).str(name).op(op::STACK_GLOBAL).put()
            } else {
                self.op(op::GLOBAL)
                    .raw(module)
                    .raw(b"\n")
                    .raw(name)
                    .raw(b"\n")
                    .put()
            }
        }

        /// A list of ints: `APPEND` for one, `MARK` … `APPENDS` in batches of 1,000.
        fn int_list(&mut self, values: &[i64]) -> &mut Self {
            self.op(op::EMPTY_LIST).put();
            if let [value] = values {
                return self.int(*value).op(op::APPEND);
            }
            for batch in values.chunks(1000) {
                self.op(op::MARK);
                for &value in batch {
                    self.int(value);
                }
                self.op(op::APPENDS);
            }
            self
        }

        fn str_list(&mut self, values: &[Vec<u8>]) -> &mut Self {
            self.op(op::EMPTY_LIST).put();
            for batch in values.chunks(1000) {
                self.op(op::MARK);
                for value in batch {
                    self.str(value);
                }
                self.op(op::APPENDS);
            }
            self
        }

        /// numpy's `ndarray.__reduce__` for a `dtype` array, replayed.
        fn array(&mut self, spec: &Array) -> &mut Self {
            self.global(spec.module, b"_reconstruct");
            self.global(b"numpy", b"ndarray");
            self.int(0).op(op::TUPLE1).put();
            self.bytes(b"b").op(op::TUPLE3).put().op(op::REDUCE).put();
            self.op(op::MARK).int(1);
            let two = spec.shape.len() == 2;
            if !two {
                self.op(op::MARK);
            }
            for &dim in &spec.shape {
                self.int(dim as i64);
            }
            self.op(if two { op::TUPLE2 } else { op::TUPLE }).put();
            self.global(b"numpy", b"dtype").str(spec.dtype);
            if self.proto4 {
                self.op(op::NEWFALSE).op(op::NEWTRUE);
            } else {
                self.int(0).int(1);
            }
            self.op(op::TUPLE3).put().op(op::REDUCE).put();
            self.op(op::MARK)
                .int(3)
                .str(b"|")
                .op(op::NONE)
                .op(op::NONE)
                .op(op::NONE)
                .int(-1)
                .int(-1)
                .int(0)
                .op(op::TUPLE)
                .put()
                .op(op::BUILD);
            self.op(if spec.fortran {
                op::NEWTRUE
            } else {
                op::NEWFALSE
            });
            self.bytes(&spec.data).op(op::TUPLE).put().op(op::BUILD)
        }

        fn stop(&mut self) -> Vec<u8> {
            self.op(op::STOP);
            if self.proto4 {
                let frame = (self.bytes.len() - 11) as u64;
                self.bytes[3..11].copy_from_slice(&frame.to_le_bytes());
            }
            std::mem::take(&mut self.bytes)
        }
    }

    /// What goes into a test pickle.
    struct Array {
        module: &'static [u8],
        dtype: &'static [u8],
        shape: Vec<usize>,
        fortran: bool,
        data: Vec<u8>,
    }

    /// A CIFAR pickle: labels per key (in `label_keys` order) and planar rows.
    struct Cifar {
        layout: Layout,
        labels: Vec<Vec<i64>>,
        array: Array,
        proto4: bool,
    }

    impl Cifar {
        /// `count` images of noise with labels in range.
        fn new(layout: Layout, count: usize) -> Self {
            let labels = layout
                .label_fields()
                .iter()
                .enumerate()
                .map(|(f, field)| {
                    noise(f as u64 + 7, count)
                        .iter()
                        .map(|&b| i64::from(b % field.classes))
                        .collect()
                })
                .collect();
            Cifar {
                layout,
                labels,
                array: Array {
                    module: b"numpy.core.multiarray",
                    dtype: b"u1",
                    shape: vec![count, IMAGE_BYTES],
                    fortran: false,
                    data: noise(count as u64, count * IMAGE_BYTES),
                },
                proto4: false,
            }
        }

        /// The dict in the key order of the real files.
        fn pickle(&self) -> Vec<u8> {
            let count = self.labels[0].len();
            let filenames: Vec<Vec<u8>> = (0..count)
                .map(|i| format!("image_{i:05}.png").into_bytes())
                .collect();
            let mut p = if self.proto4 {
                Pickler::new4()
            } else {
                Pickler::new()
            };
            p.op(op::EMPTY_DICT).put().op(op::MARK);
            match self.layout {
                Layout::Cifar10 => {
                    p.str(b"batch_label").str(b"training batch 1 of 5");
                    p.str(b"labels").int_list(&self.labels[0]);
                    p.str(b"data").array(&self.array);
                    p.str(b"filenames").str_list(&filenames);
                }
                Layout::Cifar100 => {
                    p.str(b"filenames").str_list(&filenames);
                    p.str(b"batch_label").str(b"training batch 1 of 1");
                    p.str(b"fine_labels").int_list(&self.labels[1]);
                    p.str(b"coarse_labels").int_list(&self.labels[0]);
                    p.str(b"data").array(&self.array);
                }
            }
            p.op(op::SETITEMS).stop()
        }

        /// The same images and labels as binary records.
        fn binary(&self) -> Vec<u8> {
            let mut bytes = Vec::new();
            for (i, row) in self.array.data.chunks_exact(IMAGE_BYTES).enumerate() {
                bytes.extend(self.labels.iter().map(|l| l[i] as u8));
                bytes.extend_from_slice(row);
            }
            bytes
        }
    }

    /// Parses and expects an error whose reason contains `needle`; returns it.
    fn error(bytes: &[u8], layout: Layout, needle: &str) -> PickleError {
        let err = parse(bytes, layout).expect_err(needle);
        assert!(
            err.reason().contains(needle),
            "expected `{needle}` in `{err}`"
        );
        let offset = err.offset().expect("an offset");
        assert!(offset <= bytes.len());
        assert_eq!(
            err.to_string(),
            format!("offset {offset}: {}", err.reason())
        );
        err
    }

    /// Where `needle` first occurs in `haystack`.
    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("needle present")
    }

    #[test]
    fn cifar10_matches_the_binary_reader() {
        let cifar = Cifar::new(Layout::Cifar10, 3);
        let records = parse(&cifar.pickle(), Layout::Cifar10).unwrap();
        let binary = cifar_format::parse(&cifar.binary(), Layout::Cifar10).unwrap();
        assert_eq!(records, binary);
        assert_eq!(records.len(), 3);
        assert_eq!(records.labels(1), Some(&[cifar.labels[0][1] as u8][..]));
        // Interleaved: pixel 5 of image 2 is (R, G, B) from the three planes of row 2.
        let row = &cifar.array.data[2 * IMAGE_BYTES..3 * IMAGE_BYTES];
        assert_eq!(
            &records.pixels(2).unwrap()[15..18],
            &[row[5], row[1024 + 5], row[2048 + 5]]
        );
    }

    #[test]
    fn cifar100_matches_the_binary_reader_coarse_then_fine() {
        let cifar = Cifar::new(Layout::Cifar100, 4);
        let records = parse(&cifar.pickle(), Layout::Cifar100).unwrap();
        let binary = cifar_format::parse(&cifar.binary(), Layout::Cifar100).unwrap();
        assert_eq!(records, binary);
        for i in 0..4 {
            let want = [cifar.labels[0][i] as u8, cifar.labels[1][i] as u8];
            assert_eq!(records.labels(i), Some(&want[..]));
        }
    }

    #[test]
    fn long_lists_use_several_appends_batches_and_long_binput() {
        // 1,001 images: two APPENDS batches per list and memo indices past 255.
        let cifar = Cifar::new(Layout::Cifar100, 1001);
        let bytes = cifar.pickle();
        assert!(bytes.contains(&op::LONG_BINPUT));
        let records = parse(&bytes, Layout::Cifar100).unwrap();
        let binary = cifar_format::parse(&cifar.binary(), Layout::Cifar100).unwrap();
        assert_eq!(records, binary);
    }

    #[test]
    fn one_image_uses_append() {
        let cifar = Cifar::new(Layout::Cifar10, 1);
        let bytes = cifar.pickle();
        let records = parse(&bytes, Layout::Cifar10).unwrap();
        assert_eq!(
            records,
            cifar_format::parse(&cifar.binary(), Layout::Cifar10).unwrap()
        );
    }

    #[test]
    fn python3_protocol4_and_numpy2_names_are_read() {
        let mut cifar = Cifar::new(Layout::Cifar10, 2);
        cifar.proto4 = true;
        cifar.array.module = b"numpy._core.multiarray";
        let bytes = cifar.pickle();
        assert!(bytes.contains(&op::STACK_GLOBAL) && bytes.contains(&op::BINBYTES));
        let records = parse(&bytes, Layout::Cifar10).unwrap();
        assert_eq!(
            records,
            cifar_format::parse(&cifar.binary(), Layout::Cifar10).unwrap()
        );
    }

    #[test]
    fn memo_references_share_one_object() {
        // The label list is stored under `labels`, then fetched back with BINGET and extended:
        // the dict sees the extension, as in Python.
        let data = noise(1, 2 * IMAGE_BYTES);
        let mut p = Pickler::new();
        p.op(op::EMPTY_DICT).put().op(op::MARK);
        p.str(b"labels").int_list(&[4]); // memo 2
        p.str(b"data").array(&Array {
            module: b"numpy.core.multiarray",
            dtype: b"u1",
            shape: vec![2, IMAGE_BYTES],
            fortran: false,
            data: data.clone(),
        });
        p.op(op::SETITEMS);
        p.str(b"other").raw(&[op::BINGET, 2]).int(9).op(op::APPEND);
        p.op(op::SETITEM);
        let records = parse(&p.stop(), Layout::Cifar10).unwrap();
        assert_eq!(records.labels(0), Some(&[4u8][..]));
        assert_eq!(records.labels(1), Some(&[9u8][..]));
    }

    #[test]
    fn every_truncation_is_an_error_within_the_input() {
        for bytes in [Cifar::new(Layout::Cifar10, 1).pickle(), {
            let mut cifar = Cifar::new(Layout::Cifar100, 1);
            cifar.proto4 = true;
            cifar.pickle()
        }] {
            for len in 0..bytes.len() {
                let prefix = &bytes[..len];
                for layout in [Layout::Cifar10, Layout::Cifar100] {
                    let err = parse(prefix, layout).expect_err("a truncated pickle");
                    let offset = err.offset().expect("an offset");
                    assert!(offset <= len, "offset {offset} beyond {len}: {err}");
                    assert!(!err.reason().is_empty());
                }
            }
        }
    }

    #[test]
    fn truncation_messages_name_the_opcode_and_the_lengths() {
        let mut bytes = vec![op::PROTO, 2, op::SHORT_BINSTRING, 200];
        bytes.extend([b'x'; 12]);
        let err = error(
            &bytes,
            Layout::Cifar10,
            "truncated: SHORT_BINSTRING needs 200 bytes, 12 left",
        );
        assert_eq!(err.offset(), Some(2));
        let err = error(
            &[op::PROTO, 2, op::EMPTY_DICT],
            Layout::Cifar10,
            "ends without STOP",
        );
        assert_eq!(err.offset(), Some(3));
        // Announced lengths far beyond the input are refused before anything is allocated.
        let mut huge = vec![op::PROTO, 2, op::BINSTRING];
        huge.extend(i32::MAX.to_le_bytes());
        error(&huge, Layout::Cifar10, "needs 2147483647 bytes, 0 left");
        let mut huge = vec![op::PROTO, 4, op::BINUNICODE];
        huge.extend(u32::MAX.to_le_bytes());
        error(&huge, Layout::Cifar10, "needs 4294967295 bytes, 0 left");
        let mut frame = vec![op::PROTO, 4, op::FRAME];
        frame.extend(u64::MAX.to_le_bytes());
        error(&frame, Layout::Cifar10, "FRAME announces");
        error(
            &[op::PROTO, 2, op::GLOBAL, b'o', b's'],
            Layout::Cifar10,
            "truncated: GLOBAL module name has no newline",
        );
    }

    #[test]
    fn binstring_negative_length_is_an_error() {
        let mut bytes = vec![op::PROTO, 2, op::BINSTRING];
        bytes.extend((-5i32).to_le_bytes());
        bytes.extend([0; 16]);
        let err = error(&bytes, Layout::Cifar10, "BINSTRING length -5 is negative");
        assert_eq!(err.offset(), Some(2));
    }

    #[test]
    fn not_a_pickle_or_another_protocol() {
        let err = error(
            &[],
            Layout::Cifar10,
            "not a pickle: expected PROTO 2 (0x80 0x02)",
        );
        assert_eq!(err.offset(), Some(0));
        error(b"PK\x03\x04", Layout::Cifar10, "found 0x50 0x4b");
        error(
            &[op::PROTO, 5, op::STOP],
            Layout::Cifar10,
            "protocol 5 is not supported",
        );
        // Protocol 0 (text) starts with an opcode other than PROTO.
        error(b"(dp0\n.", Layout::Cifar10, "not a pickle");
        // Binary records are not a pickle either.
        let binary = Cifar::new(Layout::Cifar10, 1).binary();
        error(&binary, Layout::Cifar10, "not a pickle");
    }

    #[test]
    fn disallowed_globals_are_refused_where_they_are() {
        for (module, name) in [
            (&b"os"[..], &b"system"[..]),
            (b"builtins", b"eval"),
            (b"__builtin__", b"eval"),
            (b"numpy.core.multiarray", b"scalar"),
            (b"numpy", b"load"),
        ] {
            let mut p = Pickler::new();
            p.op(op::EMPTY_DICT).put();
            let at = p.bytes.len();
            p.global(module, name)
                .raw(&[op::SHORT_BINSTRING, 2])
                .raw(b"id");
            p.op(op::TUPLE1).op(op::REDUCE);
            let bytes = p.stop();
            let needle = format!(
                "opcode 0x63 GLOBAL `{} {}` is not allowed",
                String::from_utf8_lossy(module),
                String::from_utf8_lossy(name)
            );
            let err = error(&bytes, Layout::Cifar10, &needle);
            assert_eq!(err.offset(), Some(at));
        }
        // The same through STACK_GLOBAL (protocol 4).
        let mut p = Pickler::new4();
        p.str(b"os").str(b"system");
        let at = p.bytes.len();
        p.op(op::STACK_GLOBAL);
        let err = error(
            &p.stop(),
            Layout::Cifar10,
            "STACK_GLOBAL `os system` is not allowed",
        );
        assert_eq!(err.offset(), Some(at));
    }

    #[test]
    fn calls_and_state_other_than_numpys_are_refused() {
        // REDUCE on something that is not an allowed global.
        let bytes = [
            op::PROTO,
            2,
            op::NONE,
            op::EMPTY_TUPLE,
            op::REDUCE,
            op::STOP,
        ];
        error(&bytes, Layout::Cifar10, "REDUCE calls None");
        // BUILD on a dict (Python would call __setstate__ or update __dict__).
        let bytes = [
            op::PROTO,
            2,
            op::EMPTY_DICT,
            op::EMPTY_TUPLE,
            op::BUILD,
            op::STOP,
        ];
        error(&bytes, Layout::Cifar10, "BUILD on a dict of 0 items");
        // numpy.ndarray called directly.
        let mut p = Pickler::new();
        p.global(b"numpy", b"ndarray")
            .op(op::EMPTY_TUPLE)
            .op(op::REDUCE);
        error(&p.stop(), Layout::Cifar10, "REDUCE calls `numpy ndarray`");
        // APPENDS to a tuple.
        let bytes = [
            op::PROTO,
            2,
            op::EMPTY_TUPLE,
            op::MARK,
            op::NONE,
            op::APPENDS,
            op::STOP,
        ];
        error(
            &bytes,
            Layout::Cifar10,
            "APPENDS to a tuple of 0: only lists",
        );
    }

    #[test]
    fn wrong_dtype_is_refused() {
        for dtype in [&b"f8"[..], b"i1", b"<u2", b"|u1", b"O"] {
            let mut cifar = Cifar::new(Layout::Cifar10, 1);
            cifar.array.dtype = dtype;
            let bytes = cifar.pickle();
            let err = error(
                &bytes,
                Layout::Cifar10,
                "is not allowed: the pixels must be `u1`",
            );
            assert!(err.reason().contains(&*String::from_utf8_lossy(dtype)));
            // The offset is that of the dtype's REDUCE, after the name.
            assert!(err.offset().unwrap() > find(&bytes, b"dtype"));
        }
    }

    #[test]
    fn fortran_order_is_refused() {
        let mut cifar = Cifar::new(Layout::Cifar10, 1);
        cifar.array.fortran = true;
        error(
            &cifar.pickle(),
            Layout::Cifar10,
            "Fortran-order arrays are not supported",
        );
    }

    #[test]
    fn shape_and_byte_count_must_agree() {
        let mut cifar = Cifar::new(Layout::Cifar10, 2);
        cifar.array.data.pop();
        error(
            &cifar.pickle(),
            Layout::Cifar10,
            "array data has 6143 bytes but shape (2, 3072) needs 6144",
        );
        // A consistent array of the wrong shape.
        let mut cifar = Cifar::new(Layout::Cifar10, 2);
        cifar.array.shape = vec![6, 1024];
        cifar.labels[0].extend([0; 4]);
        error(
            &cifar.pickle(),
            Layout::Cifar10,
            "key `data`: shape (6, 1024) is not (N, 3072)",
        );
        for (shape, text) in [(vec![2, 3, 1024], "(2, 3, 1024)"), (vec![6144], "(6144,)")] {
            let mut cifar = Cifar::new(Layout::Cifar10, 2);
            cifar.array.shape = shape;
            let needle = format!("key `data`: shape {text} is not (N, 3072)");
            error(&cifar.pickle(), Layout::Cifar10, &needle);
        }
        // No images.
        let mut cifar = Cifar::new(Layout::Cifar10, 1);
        cifar.array.shape = vec![0, IMAGE_BYTES];
        cifar.array.data.clear();
        cifar.labels[0].clear();
        error(
            &cifar.pickle(),
            Layout::Cifar10,
            "shape (0, 3072) is not (N, 3072) with N ≥ 1",
        );
        // A shape product that overflows.
        let mut cifar = Cifar::new(Layout::Cifar10, 1);
        cifar.array.shape = vec![usize::MAX >> 2, 1 << 40];
        error(
            &cifar.pickle(),
            Layout::Cifar10,
            "needs more than fits in memory",
        );
    }

    #[test]
    fn label_count_must_match_the_images() {
        let mut cifar = Cifar::new(Layout::Cifar10, 3);
        cifar.labels[0].pop();
        let bytes = cifar.pickle();
        let err = error(
            &bytes,
            Layout::Cifar10,
            "key `labels`: 2 labels but `data` has 3 images",
        );
        // The offset is the list's EMPTY_LIST, right after the key.
        assert_eq!(
            err.offset(),
            Some(find(&bytes, b"labels") + b"labels".len() + 2)
        );

        let mut cifar = Cifar::new(Layout::Cifar100, 2);
        cifar.labels[1].push(3);
        error(
            &cifar.pickle(),
            Layout::Cifar100,
            "key `fine_labels`: 3 labels but",
        );
    }

    #[test]
    fn out_of_range_labels_are_refused_at_the_label() {
        let mut cifar = Cifar::new(Layout::Cifar10, 3);
        cifar.labels[0][1] = 10;
        let err = error(
            &cifar.pickle(),
            Layout::Cifar10,
            "key `labels`: label 1 is 10, out of range 0..=9",
        );
        let bytes = cifar.pickle();
        assert_eq!(&bytes[err.offset().unwrap()..][..2], &[op::BININT1, 10]);

        for (field, value, needle) in [
            (
                0,
                20,
                "key `coarse_labels`: label 0 is 20, out of range 0..=19",
            ),
            (
                1,
                100,
                "key `fine_labels`: label 0 is 100, out of range 0..=99",
            ),
            (1, -1, "key `fine_labels`: label 0 is -1"),
            (1, 256, "key `fine_labels`: label 0 is 256"),
            (0, i64::MAX, "label 0 is 9223372036854775807"),
        ] {
            let mut cifar = Cifar::new(Layout::Cifar100, 2);
            cifar.labels[field][0] = value;
            error(&cifar.pickle(), Layout::Cifar100, needle);
        }
    }

    #[test]
    fn labels_must_be_ints() {
        let data = noise(3, IMAGE_BYTES);
        let mut p = Pickler::new();
        p.op(op::EMPTY_DICT).put().op(op::MARK);
        p.str(b"labels")
            .op(op::EMPTY_LIST)
            .put()
            .op(op::NEWTRUE)
            .op(op::APPEND);
        p.str(b"data").array(&Array {
            module: b"numpy.core.multiarray",
            dtype: b"u1",
            shape: vec![1, IMAGE_BYTES],
            fortran: false,
            data,
        });
        p.op(op::SETITEMS);
        error(
            &p.stop(),
            Layout::Cifar10,
            "key `labels`: label 0 is True, expected an int",
        );
    }

    #[test]
    fn missing_keys_name_the_keys_there_and_the_other_layout() {
        let cifar10 = Cifar::new(Layout::Cifar10, 1).pickle();
        let err = error(
            &cifar10,
            Layout::Cifar100,
            "the dict has no key `coarse_labels`",
        );
        assert!(
            err.reason()
                .contains("`batch_label`, `labels`, `data`, `filenames`")
        );
        assert!(err.reason().contains("looks like a CIFAR-10 file"));
        assert_eq!(err.offset(), Some(2));
        let cifar100 = Cifar::new(Layout::Cifar100, 1).pickle();
        let err = error(&cifar100, Layout::Cifar10, "the dict has no key `labels`");
        assert!(err.reason().contains("looks like a CIFAR-100 file"));
        // Not a dict at all.
        error(
            &[op::PROTO, 2, op::EMPTY_LIST, op::STOP],
            Layout::Cifar10,
            "the pickle holds a list of 0, expected a dict",
        );
    }

    #[test]
    fn trailing_bytes_and_unbalanced_stacks_are_errors() {
        let mut bytes = Cifar::new(Layout::Cifar10, 1).pickle();
        let end = bytes.len();
        bytes.push(op::NONE);
        let err = error(&bytes, Layout::Cifar10, "1 trailing bytes after STOP");
        assert_eq!(err.offset(), Some(end));
        error(
            &[op::PROTO, 2, op::NONE, op::NONE, op::STOP],
            Layout::Cifar10,
            "STOP with 2 objects",
        );
        error(
            &[op::PROTO, 2, op::STOP],
            Layout::Cifar10,
            "STOP with 0 objects",
        );
        error(
            &[op::PROTO, 2, op::NONE, op::MARK, op::STOP],
            Layout::Cifar10,
            "MARK(s) still open",
        );
        // Popping past a MARK is an underflow, as in Python.
        error(
            &[op::PROTO, 2, op::NONE, op::MARK, op::TUPLE1, op::STOP],
            Layout::Cifar10,
            "TUPLE1 needs an object but nothing above the MARK",
        );
        error(
            &[op::PROTO, 2, op::APPENDS, op::STOP],
            Layout::Cifar10,
            "APPENDS without a MARK",
        );
        error(
            &[op::PROTO, 2, op::BINPUT, 0],
            Layout::Cifar10,
            "BINPUT needs an object but the stack is empty",
        );
    }

    #[test]
    fn unsupported_opcodes_are_named() {
        for (code, needle) in [
            (op::INST, "opcode 0x69 INST is not supported"),
            (op::POP, "opcode 0x30 POP is not supported"),
            (op::BINFLOAT, "opcode 0x47 BINFLOAT is not supported"),
            (op::NEWOBJ, "opcode 0x81 NEWOBJ is not supported"),
            (op::BYTEARRAY8, "opcode 0x96 BYTEARRAY8 is not supported"),
            (op::PROTO, "PROTO is only allowed at the start"),
            (0x07, "byte 0x07 is not a pickle opcode"),
        ] {
            let err = error(
                &[op::PROTO, 2, op::NONE, code, 0, 0, 0, 0],
                Layout::Cifar10,
                needle,
            );
            assert_eq!(err.offset(), Some(3));
        }
        let mut long1 = vec![op::PROTO, 2, op::LONG1, 9];
        long1.extend([1; 9]);
        error(
            &long1,
            Layout::Cifar10,
            "LONG1 of 9 bytes does not fit 64 bits",
        );
    }

    #[test]
    fn huge_memo_indices_cost_one_entry() {
        // LONG_BINPUT 2^32 - 1 and LONG_BINGET it back: a valid (if odd) pickle.
        let cifar = Cifar::new(Layout::Cifar10, 1);
        let mut bytes = cifar.pickle();
        bytes.pop(); // STOP
        bytes.push(op::LONG_BINPUT);
        bytes.extend(u32::MAX.to_le_bytes());
        bytes.push(op::STOP);
        assert!(parse(&bytes, Layout::Cifar10).is_ok());

        let mut bytes = vec![op::PROTO, 2, op::EMPTY_DICT, op::LONG_BINPUT];
        bytes.extend(u32::MAX.to_le_bytes());
        bytes.push(op::LONG_BINGET);
        bytes.extend((u32::MAX - 1).to_le_bytes());
        error(
            &bytes,
            Layout::Cifar10,
            "LONG_BINGET 4294967294: nothing memoized",
        );
    }

    #[test]
    fn deep_nesting_neither_recurses_nor_crashes() {
        const DEPTH: usize = 1_000_000;
        // A million open MARKs.
        let mut bytes = vec![op::PROTO, 2];
        bytes.extend(std::iter::repeat_n(op::MARK, DEPTH));
        bytes.push(op::STOP);
        error(
            &bytes,
            Layout::Cifar10,
            "STOP with 1000000 MARK(s) still open",
        );
        // A million nested one-tuples and lists (each inside the next), dropped afterwards.
        let mut bytes = vec![op::PROTO, 2, op::NONE];
        bytes.extend(std::iter::repeat_n(op::TUPLE1, DEPTH));
        bytes.push(op::STOP);
        error(
            &bytes,
            Layout::Cifar10,
            "the pickle holds a tuple of 1, expected a dict",
        );
        let mut bytes = vec![op::PROTO, 2];
        bytes.extend(std::iter::repeat_n(op::EMPTY_LIST, DEPTH + 1));
        bytes.extend(std::iter::repeat_n(op::APPEND, DEPTH));
        bytes.push(op::STOP);
        error(
            &bytes,
            Layout::Cifar10,
            "the pickle holds a list of 1, expected a dict",
        );
        // MARK … TUPLE nested a million deep, closed in order.
        let mut bytes = vec![op::PROTO, 2];
        bytes.extend(std::iter::repeat_n(op::MARK, DEPTH));
        bytes.extend(std::iter::repeat_n(op::TUPLE, DEPTH));
        bytes.push(op::STOP);
        error(
            &bytes,
            Layout::Cifar10,
            "the pickle holds a tuple of 1, expected a dict",
        );
    }

    #[test]
    fn a_list_may_contain_itself() {
        // l = []; l.append(l): a cycle, harmless since nothing walks it.
        let bytes = [
            op::PROTO,
            2,
            op::EMPTY_LIST,
            op::BINPUT,
            0,
            op::BINGET,
            0,
            op::APPEND,
            op::STOP,
        ];
        error(&bytes, Layout::Cifar10, "the pickle holds a list of 1");
    }

    #[test]
    fn objects_are_small() {
        // The figure `MAX_OBJECTS` and the module documentation quote.
        assert!(std::mem::size_of::<Node>() <= 48);
    }

    #[test]
    fn object_count_is_limited() {
        let mut bytes = vec![op::PROTO, 2, op::MARK];
        bytes.extend([op::NONE; 11]);
        bytes.extend([op::TUPLE, op::STOP]);
        let err = Machine::run(&bytes, 10).err().expect("too many objects");
        assert!(err.reason().contains("more than 10 objects"), "{err}");
        assert_eq!(err.offset(), Some(13));
        assert!(Machine::run(&bytes, 12).is_ok());
    }
}
