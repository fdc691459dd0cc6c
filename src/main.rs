//! `baton`: parse the command line, load settings, bind, and serve.

use std::io::IsTerminal;
use std::net::TcpListener;
use std::process::ExitCode;

use clap::Parser;
use tracing::info;

use baton::cli::{Cli, Command};
use baton::client::{self, ClientCommand};
use baton::serve::{check_locality, serve, Mode, Service};

fn main() -> ExitCode {
    // Before any thread starts: threads get the stack the CEL bounds need.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", baton::THREAD_STACK_BYTES.to_string());
    }
    // Panics in the CEL parser are caught and reported as bad expressions.
    baton::expr::install_panic_hook();
    let cli = Cli::parse();
    if let Some(command) = client_command(&cli.command) {
        return match client::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("baton: {err}");
                ExitCode::from(err.kind as u8)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("baton: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The commands that talk to a running server rather than run one.
fn client_command(command: &Command) -> Option<ClientCommand<'_>> {
    match command {
        Command::Runs(args) => Some(ClientCommand::Runs(args)),
        Command::Events(args) => Some(ClientCommand::Events(args)),
        Command::Apps(args) => Some(ClientCommand::Apps(args)),
        Command::Status(args) => Some(ClientCommand::Status(args)),
        Command::Dev(_) | Command::Start(_) | Command::Serve(_) | Command::Doctor(_) => None,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (command, services, mode, (source, settings)) = match &cli.command {
        Command::Dev(args) => ("dev", Service::all(), Mode::Dev, args.settings()?),
        Command::Start(args) => ("start", Service::all(), Mode::Production, args.settings()?),
        Command::Serve(args) => (
            "serve",
            args.services.clone(),
            Mode::Production,
            args.prod.settings()?,
        ),
        Command::Doctor(args) => return doctor(&args.data_dir()?),
        // Client commands are run by `main` before this.
        _ => anyhow::bail!("not a server command"),
    };
    check_locality(&settings, &services, mode)?;
    let listener = TcpListener::bind((settings.host.as_str(), settings.port)).map_err(|err| {
        anyhow::anyhow!(
            "cannot listen on {}:{}: {err}",
            settings.host,
            settings.port
        )
    })?;
    let addr = listener.local_addr()?;
    let data = if settings.backends.uses_memory() {
        "data in MEMORY ONLY (lost when baton stops)".to_string()
    } else if settings.backends.uses_sled() {
        let dir = std::fs::canonicalize(&settings.data_dir).unwrap_or(settings.data_dir.clone());
        format!("data in {}", dir.display())
    } else {
        format!(
            "data in redis at {}",
            baton::secret::redact_url(&settings.backends.redis_url)
        )
    };
    let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
    info!(
        "baton {command} listening on http://{addr}, {data}, config from {source}, services {}",
        names.join(" ")
    );
    if settings.backends.uses_memory() {
        tracing::warn!(
            "MEMORY STORES: nothing is written to disk; every app, event and run is lost when \
             baton stops (drop --memory, or use \"sled\" in [backends], to keep them)"
        );
    }
    actix_rt::System::new().block_on(serve(settings, services, mode, listener, shutdown_signal()))
}

/// `baton doctor`: checks the embedded store and reports what is damaged.
fn doctor(dir: &std::path::Path) -> anyhow::Result<()> {
    println!("checking the store in {}", dir.display());
    let report = baton::store::sled::check::doctor(dir);
    for line in &report.lines {
        println!("{line}");
    }
    if report.damaged > 0 {
        anyhow::bail!("the store is damaged: {} problem(s) found", report.damaged);
    }
    println!("the store is healthy");
    Ok(())
}

/// Resolves at the first Ctrl-C or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    actix_rt::spawn(async {
        wait_for_signal().await;
        eprintln!("baton: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
