//! The runner's error type: failures of the *host side* (a missing tool, a download that failed, QEMU
//! that would not start). A scenario that ran and failed is not an error but a [`crate::Verdict`].

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("vm-tests needs {what}, which is missing: {hint}")]
    MissingTool { what: String, hint: String },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("kernel package: {0}")]
    Kernel(String),

    #[error("kernel module `{0}` is neither in the kernel package nor built in; check its name (underscores, no .ko)")]
    ModuleNotFound(String),

    #[error("scenario `{scenario}`: {message} (console log: {})", log.display())]
    Guest { scenario: String, message: String, log: PathBuf },
}

impl VmError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let context = context.into();
        move |source| VmError::Io { context, source }
    }
}
