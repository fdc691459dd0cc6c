//! The composition root: opens the backends, starts the services of this
//! process, serves HTTP, and shuts everything down in order. Only this file
//! knows which services run here.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use serde_json::json;
use tracing::{error, info};

use crate::actors::core_api::CoreApi;
use crate::actors::event_api::EventApi;
use crate::actors::executor::{Drain, Executor, ExecutorConfig};
use crate::actors::runner::Runner;
use crate::actors::EndedNotifier;
use crate::clock::{SharedClock, SystemClock};
use crate::http::{self, AppState};
use crate::sdk::SdkClient;
use crate::settings::{BusKind, Settings};
use crate::store::open_backends;
use crate::store::sled::SledDb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    EventApi,
    Runner,
    Executor,
    CoreApi,
}

impl Service {
    pub fn all() -> Vec<Service> {
        vec![
            Service::EventApi,
            Service::Runner,
            Service::Executor,
            Service::CoreApi,
        ]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Service::EventApi => "event-api",
            Service::Runner => "runner",
            Service::Executor => "executor",
            Service::CoreApi => "api",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Service {
    type Err = String;

    fn from_str(text: &str) -> Result<Service, String> {
        Service::all()
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Service::all().iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown service {text:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Development (`baton dev`: no keys, `/dev` served) or production
/// (`baton start` / `baton serve`: keys required, SDK requests checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dev,
    Production,
}

impl Mode {
    /// What sync pings say in `X-Inngest-Server-Kind`.
    pub fn server_kind(self) -> &'static str {
        match self {
            Mode::Dev => "dev",
            Mode::Production => "cloud",
        }
    }
}

/// Refuses backend choices that cannot work for the services of this
/// process: sled, the memory stores and the in-process bus keep their data
/// in one process. The memory stores keep nothing, so production refuses
/// them.
pub fn check_locality(settings: &Settings, services: &[Service], mode: Mode) -> anyhow::Result<()> {
    if settings.backends.uses_memory() && mode == Mode::Production {
        anyhow::bail!(
            "the memory stores keep nothing (everything is lost when baton stops), so only \
             `baton dev` runs on them; set backends.state, backends.queue and backends.data \
             to \"sled\" or \"redis\""
        );
    }
    let all = Service::all().iter().all(|s| services.contains(s));
    if settings.backends.uses_sled() && !all {
        anyhow::bail!(
            "sled keeps its data inside one process, so it only works when every service \
             runs in this process (baton dev, baton start, or baton serve with all four); \
             set backends.state, backends.queue and backends.data to \"redis\" to split services"
        );
    }
    if settings.backends.bus == BusKind::Memory && !all {
        anyhow::bail!(
            "the memory event bus only carries events within one process, so it only works \
             when every service runs in this process; set backends.bus to \"nats\" to split services"
        );
    }
    Ok(())
}

/// HTTP worker threads.
const HTTP_WORKERS: usize = 2;

/// The connection limit to use: `configured`, but below what the process's
/// file limit allows (raised to its hard limit first), leaving room for
/// the store's files and the calls to apps.
fn connection_limit(configured: usize, call_workers: usize) -> usize {
    let Some(files) = raise_file_limit() else {
        return configured;
    };
    let reserve = 256 + call_workers as u64;
    let allowed = files.saturating_sub(reserve).max(64) as usize;
    if configured > allowed {
        tracing::warn!(
            configured,
            allowed,
            open_files = files,
            "server.max_connections is above what the open-file limit allows; using {allowed}"
        );
        return allowed;
    }
    configured
}

/// Raises the soft limit of open files to the hard one (as Go programs
/// do); returns the soft limit in force.
#[cfg(unix)]
fn raise_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        let wanted = limit.rlim_max.min(1 << 20);
        if wanted > limit.rlim_cur {
            let raised = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = wanted;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    Some(limit.rlim_cur as u64)
}

#[cfg(not(unix))]
fn raise_file_limit() -> Option<u64> {
    None
}

/// Runs the given services until `shutdown` resolves or a service ends.
/// Returns an error if a service ended on its own.
pub async fn serve(
    settings: Settings,
    services: Vec<Service>,
    mode: Mode,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    check_locality(&settings, &services, mode)?;
    let clock: SharedClock = Arc::new(SystemClock);
    let (backends, db) =
        open_backends(&settings.backends, &settings.data_dir, settings.cache_bytes)
            .await
            .context("failed to open the backends")?;
    let (ended, mut ended_rx) = EndedNotifier::new();
    let runs = |service| services.contains(&service);
    // The Connect gateway: a worker's socket and the calls routed to it
    // meet in one process, so it is served where the executor and the API
    // (which syncs the workers' apps) both run.
    let gateway = (runs(Service::Executor) && runs(Service::CoreApi)).then(|| {
        Arc::new(crate::connect::Gateway::new(
            settings.connect.clone(),
            crate::actors::endpoint::RunTokens::new(
                settings.signing_key.as_deref(),
                settings.signing_key_fallback.as_deref(),
            ),
        ))
    });
    let client = SdkClient::new(settings.signing_key.clone(), settings.call_timeout);
    let client = match &gateway {
        Some(gateway) => client.with_connect(gateway.clone()),
        None => client,
    };

    let event_api = runs(Service::EventApi).then(|| EventApi::new(backends.clone()).start());
    // The runner and the executor each get a thread (arbiter) of their own,
    // so that creating runs and calling apps do not wait for each other.
    let mut arbiters = Vec::new();
    let runner = runs(Service::Runner).then(|| {
        let arbiter = actix::Arbiter::new();
        let (backends, clock, ended) = (backends.clone(), clock.clone(), ended.clone());
        let addr = Runner::start_in_arbiter(&arbiter.handle(), move |_| {
            Runner::new(backends, clock, ended)
        });
        arbiters.push(arbiter);
        addr
    });
    let executor = runs(Service::Executor).then(|| {
        let arbiter = actix::Arbiter::new();
        let (backends, clock, client, ended) = (
            backends.clone(),
            clock.clone(),
            client.clone(),
            ended.clone(),
        );
        let config = ExecutorConfig {
            workers: settings.workers,
            timer_workers: settings.timer_workers,
            lease_ttl: settings.lease_ttl,
            retry_interval: settings.retry_interval,
            checkpointing: settings.checkpointing,
        };
        let addr = Executor::start_in_arbiter(&arbiter.handle(), move |_| {
            Executor::new(backends, clock, client, config, ended)
        });
        arbiters.push(arbiter);
        addr
    });
    let core_api = runs(Service::CoreApi).then(|| {
        let core = CoreApi::new(
            backends.clone(),
            clock.clone(),
            client.clone(),
            mode.server_kind(),
            settings.sync_urls.clone(),
        );
        let core = match settings.retention {
            Some(max_age) => core.with_retention(
                max_age,
                settings.retention_interval,
                settings.retention_batch,
            ),
            None => core,
        };
        let core = match (&settings.discovery, mode) {
            (Some(discovery), Mode::Dev) => {
                core.with_discovery(crate::actors::discovery::Discovery::new(
                    discovery.clone(),
                    settings.sync_urls.clone(),
                ))
            }
            _ => core,
        };
        core.start()
    });

    let otel = match &settings.otel {
        Some(otel) => {
            let size_db = db.clone();
            let store_size: Arc<dyn Fn() -> u64 + Send + Sync> =
                Arc::new(move || size_db.as_ref().map(SledDb::size_on_disk).unwrap_or(0));
            Some(
                crate::otel::start(otel, backends.clone(), clock.clone(), store_size)
                    .context("failed to start the OpenTelemetry export")?,
            )
        }
        None => None,
    };
    // Realtime is served with the API; with the NATS bus its messages
    // cross processes over NATS core subjects.
    let realtime = if runs(Service::CoreApi) {
        let transport = crate::store::open_realtime_transport(&settings.backends)
            .await
            .context("failed to open the realtime transport")?;
        let keys = match mode {
            Mode::Dev => crate::realtime::TokenKeys::dev(),
            Mode::Production => crate::realtime::TokenKeys::from_signing_keys(
                settings.signing_key.as_deref(),
                settings.signing_key_fallback.as_deref(),
            ),
        };
        Some(Arc::new(crate::realtime::Realtime::new(
            settings.realtime.clone(),
            keys,
            transport,
        )))
    } else {
        None
    };
    let size_db = db.clone();
    let auth = http::Auth::new(
        mode == Mode::Production,
        settings.signing_key.as_deref(),
        settings.signing_key_fallback.as_deref(),
        settings.event_keys.clone(),
    );
    let state = web::Data::new(AppState {
        backends: backends.clone(),
        clock: clock.clone(),
        event_api,
        core_api,
        executor: executor.clone(),
        runner,
        max_body_bytes: settings.max_body_bytes,
        info: json!({
            "dir": settings.data_dir.display().to_string(),
            "sdkURLs": settings.sync_urls,
            "retryInterval": settings.retry_interval.map(|d| d.as_secs_f64()),
            "workers": settings.workers,
            "timerWorkers": settings.timer_workers,
        }),
        store_size: Box::new(move || size_db.as_ref().map(SledDb::size_on_disk).unwrap_or(0)),
        auth,
        dev_mode: mode == Mode::Dev,
        sessions: http::session::Sessions::new(
            settings.dashboard_password.clone(),
            settings.session_ttl,
        )
        .with_secure_cookie(settings.secure_cookie),
        retention: settings.retention,
        guard: http::guard::Guard::new(
            mode == Mode::Dev,
            &settings.host,
            &settings.allowed_hosts,
            settings.trusted_proxies.clone(),
            settings.body_timeout,
        ),
        lease_ttl: settings.lease_ttl,
        endpoints: std::sync::Arc::new(crate::actors::endpoint::Endpoints::new(
            crate::actors::endpoint::RunTokens::new(
                settings.signing_key.as_deref(),
                settings.signing_key_fallback.as_deref(),
            ),
            settings.retry_interval,
        )),
        realtime: realtime.clone(),
        connect: gateway.clone(),
    });
    // `baton dev` also serves on the next port, where Inngest's dev server
    // has its Connect gateway (8289), when that port is free.
    let dev_gateway_listener = match (&gateway, mode, settings.port) {
        (Some(_), Mode::Dev, port) if port != 0 && port < u16::MAX => {
            let host = listener.local_addr().map(|a| a.ip())?;
            match std::net::TcpListener::bind((host, port + 1)) {
                Ok(second) => {
                    info!(
                        port = port + 1,
                        "connect gateway also listening on the next port"
                    );
                    Some(second)
                }
                Err(err) => {
                    info!(port = port + 1, error = %err, "not listening on the next port too");
                    None
                }
            }
        }
        _ => None,
    };
    let max_connections = connection_limit(settings.max_connections, settings.workers);
    let server = HttpServer::new(move || {
        let state = state.clone();
        App::new()
            .wrap(actix_web::middleware::from_fn(http::require_auth))
            .wrap(actix_web::middleware::from_fn(http::guard::protect))
            .configure(move |config| http::configure(config, state))
    })
    .disable_signals()
    .shutdown_timeout(5)
    .workers(HTTP_WORKERS)
    // Slow clients are cut off (headers here, bodies in `guard::protect`),
    // and connections are limited, so that they cannot hold every file
    // descriptor and stop the accept loop.
    .client_request_timeout(settings.header_timeout)
    .max_connections(max_connections.div_ceil(HTTP_WORKERS))
    .listen(listener)
    .context("failed to serve on the listener")?;
    let server = match dev_gateway_listener {
        Some(second) => server
            .listen(second)
            .context("failed to serve on the next port")?,
        None => server,
    }
    .run();
    let handle = server.handle();
    let mut server_task = actix_rt::spawn(server);

    let mut failure = None;
    tokio::select! {
        () = shutdown => info!("shutting down"),
        Some((service, why)) = ended_rx.recv() => {
            error!(%service, %why, "a service ended; stopping the others");
            failure = Some(format!("service {service} ended: {why}"));
        }
        result = &mut server_task => {
            failure = Some(format!("the HTTP server stopped: {result:?}"));
        }
    }
    // Realtime subscribers are told to reconnect elsewhere, so that their
    // connections do not hold up the graceful stop.
    if let Some(realtime) = &realtime {
        realtime.hub.close_all();
    }
    // Connect workers likewise: they reconnect (to the next process) and
    // flush what they answer meanwhile; calls in flight are retried.
    if let Some(gateway) = &gateway {
        gateway.close_all();
    }
    // Stop taking requests, then let calls in flight finish, then flush.
    handle.stop(true).await;
    if let Some(executor) = executor {
        let _ = executor
            .send(Drain {
                timeout: Duration::from_secs(10),
            })
            .await;
    }
    // Runs ended while draining are in the export queue: send them, and
    // the last metrics, before the store closes.
    if let Some(otel) = otel {
        otel.stop(Duration::from_secs(5)).await;
    }
    for arbiter in &arbiters {
        arbiter.stop();
    }
    if let Some(db) = &db {
        db.flush().await.context("failed to flush the store")?;
    }
    info!("stopped");
    match failure {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}
