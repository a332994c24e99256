//! Prints an NBD URI that presents a metadata server's capability to a
//! `sanvol-target` on a unix socket: for benchmarks and manual tests with
//! NBD tools (fio's nbd engine, nbdcopy, nbdinfo), which take any export
//! name in a URI. The capability is the server's own (every byte of the
//! device), valid for a day.
//!
//! Usage: mint_capability SOCKET SERVER_PRIVATE_KEY_FILE [EXPORT]

use blockio::uri::NbdUri;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, key, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: mint_capability SOCKET SERVER_PRIVATE_KEY_FILE [EXPORT]");
    };
    let key = control_client::keys::load_private(std::path::Path::new(key))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let capability = volume_format::capability::SignedCapability::sign(
        volume_format::capability::Capability {
            holder: volume_format::capability::Holder::Server,
            generation: 1,
            device_uuid: None,
            writable: vec![volume_format::label::ByteRange::new(0, u64::MAX)],
            issued_unix_secs: now,
            expires_unix_secs: now + volume_format::capability::CAPABILITY_LIFETIME_DEFAULT_SECS,
        },
        &key,
    );
    let base = rest.first().map(String::as_str).unwrap_or("");
    println!("{}", NbdUri::unix(socket, capability.export_name(base)));
    Ok(())
}
