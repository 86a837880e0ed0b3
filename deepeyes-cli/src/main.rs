//! The `deepeyes` command. It only parses arguments, sets up logging and composes the library
//! crates; all behaviour lives in them.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod logging;

/// mimalloc, keeping the memory it frees (see [`keep_freed_memory`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc never to return freed memory to the system. The training engine allocates and
/// frees its tensors op by op; returned pages come back as fresh zeroed pages, one page fault per
/// 4 KiB, which cost the GRPO update about a tenth of its time (`deepeyes-rl/benches/README.md`).
#[allow(unsafe_code)]
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc.h (not among libmimalloc-sys' constants): -1 is
    /// "never purge".
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is a plain store into mimalloc's option table, valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

/// Makes this binary the host of isolated plugins (`deepeyes plugin-host`): the host then always
/// matches the running deepeyes, and nothing else needs installing.
fn use_self_as_plugin_host() {
    match std::env::current_exe() {
        Ok(exe) => {
            deepeyes_tools::PluginHost::set_default(
                deepeyes_tools::PluginHost::new(exe).arg("plugin-host"),
            );
        }
        Err(e) => tracing::debug!("cannot name this executable as the plugin host: {e}"),
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = cli::Cli::parse();
    logging::init(cli.global.verbose, cli.global.quiet);
    use_self_as_plugin_host();
    match commands::dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {}", error_chain(&err));
            }
            ExitCode::FAILURE
        }
    }
}

/// The whole chain of `err` on one line ("loading the model: tokenizer.json: not found"), each
/// cause once: many errors already show their source in their own message, and anyhow's `{:#}`
/// would print it a second time ("x.png: unexpected end of file: unexpected end of file").
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    /// An error that shows its source in its own message, as many library errors do.
    #[derive(Debug)]
    struct Io {
        path: String,
        source: std::io::Error,
    }

    impl std::fmt::Display for Io {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for Io {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = Io {
            path: "a.png".into(),
            source: std::io::Error::other("unexpected end of file"),
        };
        let err = anyhow::Error::new(io).context("evaluating");
        assert_eq!(
            error_chain(&err),
            "evaluating: a.png: unexpected end of file"
        );
        // anyhow's own rendering repeats the innermost cause.
        assert!(format!("{err:#}").ends_with("end of file: unexpected end of file"));
        let plain = anyhow::anyhow!("no checkpoint").context("resuming");
        assert_eq!(error_chain(&plain), "resuming: no checkpoint");
    }
}
