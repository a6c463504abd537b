//! Scratch buffers, two per thread, kept between convs and calls: one for a task's own work
//! (im2col columns, a Winograd task's V and M) and one for what a conv's tasks share (a
//! Winograd conv's transformed input, made in a parallel pass of its own).

use std::cell::Cell;
use std::ops::{Deref, DerefMut};

thread_local! {
    /// The buffers, kept between convs and calls so that every conv does not fault in fresh
    /// pages: [`Slot::Own`]'s at most [`IM2COL_FLOATS`](super::geometry::IM2COL_FLOATS) floats
    /// per thread that ran a conv.
    static BUFFERS: [Cell<Vec<f32>>; 2] = const { [Cell::new(Vec::new()), Cell::new(Vec::new())] };
}

/// Which of a thread's two buffers.
#[derive(Clone, Copy)]
enum Slot {
    Own = 0,
    Shared = 1,
}

/// One of the calling thread's scratch buffers, handed back when dropped (a nested user gets a
/// fresh one; the larger is kept).
pub(crate) struct ColsBuffer(Vec<f32>, Slot);

impl ColsBuffer {
    /// The calling thread's buffer for a task's own work (empty on first use).
    pub(crate) fn take() -> Self {
        Self::take_slot(Slot::Own)
    }

    /// The calling thread's buffer for what the tasks of one parallel region share (empty on
    /// first use): taken by the thread that starts the region, read by all its tasks.
    pub(crate) fn take_shared() -> Self {
        Self::take_slot(Slot::Shared)
    }

    fn take_slot(slot: Slot) -> Self {
        Self(BUFFERS.with(|b| b[slot as usize].take()), slot)
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
        BUFFERS.with(|b| {
            let cell = &b[self.1 as usize];
            let other = cell.take();
            cell.set(if other.capacity() > mine.capacity() {
                other
            } else {
                mine
            });
        });
    }
}
