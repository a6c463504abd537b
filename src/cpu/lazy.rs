//! Values made on first use, without holding their cell while they are made.

use std::sync::OnceLock;

/// `cell`'s value, made by `make` on first use without holding the cell while `make` runs.
///
/// The engines' lazily made forms (a conv's transformed or packed weights, the kNN's
/// quantised bank) are made with rayon, and a pool thread waiting on those tasks may pick up
/// other queued work: another call through the same value (a second caller's forward, which
/// the inference engine runs on the pool), which would reach this cell while the first is
/// filling it. `OnceLock::get_or_init` deadlocks there; here the second call makes its own
/// value, and the first one stored is kept.
///
/// ```ignore
/// let cell = OnceLock::new();
/// assert_eq!(*get_or_make(&cell, || 7), 7);
/// assert_eq!(*get_or_make(&cell, || 8), 7);
/// ```
pub(crate) fn get_or_make<T>(cell: &OnceLock<T>, make: impl FnOnce() -> T) -> &T {
    match cell.get() {
        Some(value) => value,
        None => {
            let value = make();
            cell.get_or_init(|| value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_value_stored_is_kept() {
        let cell = OnceLock::new();
        assert_eq!(*get_or_make(&cell, || 7), 7);
        assert_eq!(*get_or_make(&cell, || 8), 7);
    }
}
