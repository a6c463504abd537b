//! The im2col scratch buffer, one per thread, kept between convs and calls.

use std::cell::Cell;
use std::ops::{Deref, DerefMut};

thread_local! {
    /// The im2col buffer, kept between convs and calls so that every conv does not fault in
    /// fresh pages (at most [`IM2COL_FLOATS`](super::geometry::IM2COL_FLOATS) floats per thread that ran a conv).
    static COLS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The calling thread's im2col buffer, handed back when dropped (a nested user gets a fresh
/// one; the larger is kept).
pub(crate) struct ColsBuffer(Vec<f32>);

impl ColsBuffer {
    /// The calling thread's buffer (empty on first use).
    pub(crate) fn take() -> Self {
        Self(COLS.take())
    }
}
impl Deref for ColsBuffer {
    type Target = Vec<f32>;

    fn deref(&self) -> &Vec<f32> {
        &self.0
    }
}

impl DerefMut for ColsBuffer {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

impl Drop for ColsBuffer {
    fn drop(&mut self) {
        let mine = std::mem::take(&mut self.0);
        let other = COLS.take();
        COLS.set(if other.capacity() > mine.capacity() {
            other
        } else {
            mine
        });
    }
}
