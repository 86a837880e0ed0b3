//! `deepeyes-plugin-host`: the child process an isolated tool plugin (`isolate = true`) runs in.
//! Its parent starts it, speaks to it on stdin/stdout and kills it when a call goes wrong; it is
//! not meant to be run by hand. See `deepeyes_tools::plugin::isolate`.

fn main() -> std::process::ExitCode {
    deepeyes_tools::plugin::host::run()
}
