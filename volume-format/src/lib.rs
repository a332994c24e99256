//! Everything in sanvol that is a *format*: bytes on a device or on the wire.
//!
//! Pure code over byte buffers and `Read`/`Write`: no sockets, no tokio.
