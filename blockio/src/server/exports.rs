//! What the server serves: exports by name.
//!
//! Why a trait: the metadata server's exports (volumes, snapshot
//! pseudo-devices) come and go with pool state, so the NBD server asks an
//! [`ExportSource`] at handshake time instead of holding a fixed list.
//! [`ExportTable`] is the simple in-memory source for tests and tools.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::device::BlockDevice;

/// One named export.
#[derive(Clone)]
pub struct Export {
    /// Name clients ask for (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`).
    pub name: String,
    /// Free text shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device accepts them.
    pub read_only: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.device.size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Export {
    /// A writable export with an empty description.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Export {
        Export { name: name.into(), description: String::new(), device, read_only: false }
    }

    /// Whether writes must be refused (by policy or by the device).
    pub fn is_read_only(&self) -> bool {
        self.read_only || self.device.is_read_only()
    }
}

/// Where the server looks exports up.
pub trait ExportSource: Send + Sync + 'static {
    /// `(name, description)` of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
    /// The export called `name`; `""` asks for the default export.
    fn lookup(&self, name: &str) -> Option<Export>;

    /// What the handshake asks: the export called `name`, or why not. A
    /// source that checks credentials carried in the name (a fencing
    /// target's capability) says why it refused; the client gets
    /// `NBD_REP_ERR_POLICY` with that message. Default: [`Self::lookup`].
    fn open(&self, name: &str) -> Result<Export, ExportRefusal> {
        self.lookup(name).ok_or(ExportRefusal::Unknown)
    }
}

/// Why [`ExportSource::open`] refused a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportRefusal {
    /// No such export (`NBD_REP_ERR_UNKNOWN`).
    Unknown,
    /// The export exists but this client may not have it
    /// (`NBD_REP_ERR_POLICY`), with a message for the operator.
    Policy(String),
}

/// A fixed, mutable table of exports.
#[derive(Default)]
pub struct ExportTable {
    inner: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    exports: HashMap<String, Export>,
    default_name: Option<String>,
}

impl ExportTable {
    pub fn new() -> ExportTable {
        ExportTable::default()
    }

    /// A table with one export that is also the default export.
    pub fn single(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> ExportTable {
        let table = ExportTable::new();
        let export = Export::new(name, device);
        table.set_default(Some(export.name.clone()));
        table.insert(export);
        table
    }

    /// Adds or replaces the export of the same name.
    pub fn insert(&self, export: Export) {
        let mut t = self.inner.write().unwrap_or_else(|e| e.into_inner());
        t.exports.insert(export.name.clone(), export);
    }

    /// Removes an export; connections already using it keep it.
    pub fn remove(&self, name: &str) -> Option<Export> {
        let mut t = self.inner.write().unwrap_or_else(|e| e.into_inner());
        t.exports.remove(name)
    }

    /// Which export the empty name selects (`None`: only an export
    /// literally named `""`).
    pub fn set_default(&self, name: Option<String>) {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).default_name = name;
    }
}

impl ExportSource for ExportTable {
    fn list(&self) -> Vec<(String, String)> {
        let t = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = t.exports.values().map(|e| (e.name.clone(), e.description.clone())).collect();
        list.sort();
        list
    }

    fn lookup(&self, name: &str) -> Option<Export> {
        let t = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if let Some(export) = t.exports.get(name) {
            return Some(export.clone());
        }
        if name.is_empty() {
            return t.default_name.as_ref().and_then(|d| t.exports.get(d)).cloned();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryDevice;

    #[test]
    fn default_export_and_lookup() {
        let table = ExportTable::single("disk", Arc::new(MemoryDevice::new(4096)));
        assert_eq!(table.lookup("").unwrap().name, "disk");
        assert_eq!(table.lookup("disk").unwrap().name, "disk");
        assert!(table.lookup("other").is_none());
        table.insert(Export { description: "second".into(), ..Export::new("b", Arc::new(MemoryDevice::new(1))) });
        assert_eq!(table.list(), vec![("b".to_string(), "second".to_string()), ("disk".to_string(), String::new())]);
        table.remove("disk");
        assert!(table.lookup("").is_none());
    }
}
