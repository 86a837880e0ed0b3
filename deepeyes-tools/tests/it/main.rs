//! Integration tests of deepeyes-tools: real plugin libraries built from the workspace, loaded,
//! listed, misused, and driven through the agent loop.

mod agent_loop;
mod isolation;
mod plugins;
mod support;
