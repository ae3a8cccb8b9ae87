//! Where the stack's outgoing frames go: [`FrameOut`] lends the stack a buffer to build each
//! frame in, so a data segment is built once, straight where it is sent from (the bypass
//! worker's UMEM frame), instead of in the stack's scratch buffer and then copied.
//!
//! Owns the seam only: which buffer a frame is built in and what happens to it afterwards is
//! the implementor's business (the bypass proxy: a UMEM frame queued on the TX ring).
//! [`Copying`] adapts a plain `FnMut(&[u8])` (tests, the I/O benchmark): frames are built in
//! the stack's scratch buffer and handed over as a slice, as before.

/// A destination for the frames the stack emits.
pub trait FrameOut {
    /// Hands over a frame built elsewhere (control segments: SYN-ACKs, RSTs, replies).
    fn send(&mut self, frame: &[u8]);

    /// Builds one frame in a buffer of the implementor's (or, by default, in `scratch`, then
    /// [`send`](Self::send)s it): `build` writes the frame from the buffer's first byte and
    /// returns its length, or an error, in which case nothing is sent.
    fn build<E>(
        &mut self,
        scratch: &mut [u8],
        build: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), E> {
        let n = build(scratch)?;
        self.send(scratch.get(..n).unwrap_or(scratch));
        Ok(())
    }
}

/// A closure that takes finished frames as slices.
pub struct Copying<F>(pub F);

impl<F: FnMut(&[u8])> FrameOut for Copying<F> {
    fn send(&mut self, frame: &[u8]) {
        (self.0)(frame)
    }
}

/// A `&mut` to a destination is a destination (so a caller's `&mut out` can be passed on).
impl<T: FrameOut + ?Sized> FrameOut for &mut T {
    fn send(&mut self, frame: &[u8]) {
        (**self).send(frame)
    }

    fn build<E>(
        &mut self,
        scratch: &mut [u8],
        build: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), E> {
        (**self).build(scratch, build)
    }
}
