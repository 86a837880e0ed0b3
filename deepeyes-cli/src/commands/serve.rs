//! `deepeyes serve`: the agent of a model bundle behind an OpenAI-compatible HTTP API
//! (`deepeyes_core::serve`). Prints the address it listens on, then serves until Ctrl-C.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use deepeyes_core::onnx::OnnxModel;
use deepeyes_core::serve::{ServeConfig, ServedModel, Server};

/// Arguments of `deepeyes serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The model bundle directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The address to listen on; 127.0.0.1 keeps the server to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0: any free port; the one taken is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model name clients send [default: the bundle directory's name].
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,
    /// The environment variable holding the API key clients must send as a Bearer token.
    #[arg(long, value_name = "NAME")]
    api_key_env: Option<String>,
    /// Requests admitted at once; more are answered 429.
    #[arg(long, default_value_t = ServeConfig::default().max_requests, value_name = "N")]
    max_requests: usize,
    /// Most episodes stepped in one batched generate round.
    #[arg(long, default_value_t = ServeConfig::default().max_batch, value_name = "N")]
    max_batch: usize,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = ServeConfig::default().max_body_bytes >> 20, value_name = "MIB")]
    max_body_mib: usize,
    /// Take SGLang's /update_weights_from_disk without an API key (with one, the key allows it).
    #[arg(long)]
    allow_weight_updates: bool,
    /// Fetch http(s) image URLs in chat requests (otherwise only data URLs are taken).
    #[arg(long)]
    allow_image_urls: bool,
    /// Most images in one request.
    #[arg(long, default_value_t = ServeConfig::default().max_images, value_name = "N")]
    max_images: usize,
    #[command(flatten)]
    limits: super::AgentLimitArgs,
    #[command(flatten)]
    bundle: super::BundleRunArgs,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<ServeConfig> {
        let model_name = match &self.served_model_name {
            Some(name) => name.clone(),
            None => std::fs::canonicalize(&self.model)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| ServeConfig::default().model_name),
        };
        let api_key = match &self.api_key_env {
            Some(var) => Some(std::env::var(var).with_context(|| {
                format!("--api-key-env {var}: the environment variable is not set")
            })?),
            None => None,
        };
        let config = ServeConfig {
            model_name,
            max_requests: self.max_requests,
            max_batch: self.max_batch,
            max_body_bytes: self.max_body_mib << 20,
            max_images: self.max_images,
            api_key,
            allow_weight_updates: self.allow_weight_updates,
            allow_image_urls: self.allow_image_urls,
            ..ServeConfig::default()
        };
        config.validate()?;
        Ok(config)
    }
}

/// Loads the bundle and serves it.
pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    let (templates, registry) = args.bundle.templates_and_tools(&args.model)?;
    // Each request sets its own sampling; the limits are the bundle's.
    let agent = args.limits.agent_config(&args.model, 1.0)?;
    let options = args.bundle.onnx_options();
    // A model that may take new weights keeps its initializers in buffers it owns, written in
    // place on each update (a fixed one lets ONNX Runtime own them).
    let updatable = config.allow_weight_updates || config.api_key.is_some();
    let model = if updatable {
        let weights =
            deepeyes_core::onnx::weights::read_safetensors(&args.model.join("model.safetensors"))
                .with_context(|| format!("reading the weights of {}", args.model.display()))?;
        OnnxModel::load_with_weights(&args.model, &options, &weights)
    } else {
        OnnxModel::load(&args.model, &options)
    }
    .with_context(|| format!("loading the model bundle {}", args.model.display()))?;
    let name = config.model_name.clone();
    let model = Arc::new(model);
    let served = if updatable {
        ServedModel::updatable(model)
    } else {
        ServedModel::fixed(model)
    };
    let server = Server::new(served, registry.tools(), templates, agent, config)
        .context("starting the agent server")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
        let address = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "serving {name} on http://{address}/v1 (Ctrl-C stops)")?;
            out.flush()?;
        }
        server
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
