//! The host-side NBD peers scenarios use, without booting a VM: each answers on its port at once
//! (the listener is bound before the server runs, so there is nothing to wait for).

use std::io::Read;
use std::net::TcpStream;

use blockio::memory::MemoryDevice;
use vm_tests::host::{BlockioExport, NbdkitExport};

fn greeting(port: u16) -> [u8; 16] {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn nbdkit_export_is_served_on_the_pre_bound_port() {
    let export = NbdkitExport::spawn(&["memory", "1M"]).unwrap();
    let g = greeting(export.port());
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT", "newstyle negotiation");
}

#[test]
fn blockio_export_is_served_and_readable_from_the_host() {
    let export = BlockioExport::serve(MemoryDevice::with_contents(1 << 20, b"hello")).unwrap();
    let g = greeting(export.port());
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(export.read(0, 5).unwrap(), b"hello");
}
