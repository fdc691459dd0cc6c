//! The crash torture of `torture.rs` on a split deployment: `baton serve
//! event-api runner`, `baton serve api` and two `baton serve executor`
//! processes over a Redis and a NATS server of the test's own (on free
//! ports, data in a temporary folder; the shared servers are never touched),
//! with the real Node SDK app in production mode. While events keep arriving,
//! one of the six processes is `kill -9`ed at a random moment and restarted
//! (the services on their ports, Redis on its append-only file, NATS on its
//! JetStream folder), in an order shuffled once and repeated, so that the
//! default 6 kills (CI) stop each once. `BATON_TORTURE_KILLS=100 cargo test
//! --release --test it split_torture -- --nocapture` is the long run (it
//! prints its figures). A `baton serve` process that exits by itself (a
//! service that ended) is restarted too, and counted. Checked as in
//! `torture.rs`: no acknowledged event lost, every run finished, no stored
//! step body ran again, memory after each restart bounded.

use rand::seq::SliceRandom;
use serde_json::json;

use crate::support::*;
use crate::torture::{kills, Target, Torture};

const TEST: &str = "split torture";
const SIGNING_KEY: &str =
    "signkey-test-0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const EVENT_KEY: &str = "torture-event-key";

fn bearer() -> String {
    format!(
        "Bearer {}",
        baton::sdk::hashed_signing_key(SIGNING_KEY).unwrap()
    )
}

/// One `baton serve` process of the deployment, restarted on its port.
struct Service {
    name: &'static str,
    options: BatonOptions,
    data_dir: std::path::PathBuf,
    baton: Baton,
}

impl Service {
    fn start(dir: &std::path::Path, name: &'static str, services: &[&str], config: &str) -> Self {
        let mut command = vec!["serve".to_string()];
        command.extend(services.iter().map(|s| s.to_string()));
        let mut options = BatonOptions {
            command,
            config: Some(config.to_string()),
            ..BatonOptions::default()
        };
        let data_dir = dir.join(name);
        let baton = Baton::start_with(&data_dir, options.clone());
        options.port = baton.port;
        Service {
            name,
            options,
            data_dir,
            baton,
        }
    }

    fn restart(&mut self) {
        self.baton.kill_9();
        self.baton = Baton::start_with(&self.data_dir, self.options.clone());
    }
}

/// What the torture kills.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Service(usize),
    Redis,
    Nats,
}

#[tokio::test]
async fn split_deployment_torture_loses_nothing_and_repeats_no_stored_step() {
    let Some(mut redis) = OwnServer::start(TEST, ServerKind::Redis) else {
        return;
    };
    let Some(mut nats) = OwnServer::start(TEST, ServerKind::Nats) else {
        return;
    };
    let kills = kills(6);
    let config = format!(
        "[backends]\nstate = \"redis\"\nqueue = \"redis\"\ndata = \"redis\"\nbus = \"nats\"\n\
         redis_url = \"{}\"\nredis_prefix = \"torture:\"\n\
         nats_url = \"{}\"\nnats_stream = \"TORTURE\"\nnats_subject = \"torture\"\n\
         [keys]\nsigning_key = \"{SIGNING_KEY}\"\nevent_keys = [\"{EVENT_KEY}\"]\n",
        redis.url(),
        nats.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut services = vec![
        Service::start(dir.path(), "events", &["event-api", "runner"], &config),
        Service::start(dir.path(), "api", &["api"], &config),
        Service::start(dir.path(), "exec-a", &["executor"], &config),
        Service::start(dir.path(), "exec-b", &["executor"], &config),
    ];
    let events_url = services[0].baton.url.clone();
    let api_url = services[1].baton.url.clone();

    let app = SdkApp::launch(
        Sdk::Node,
        &api_url,
        free_port(),
        &[
            ("INNGEST_SIGNING_KEY", SIGNING_KEY),
            ("INNGEST_EVENT_KEY", EVENT_KEY),
            ("INNGEST_EVENT_API_BASE_URL", events_url.as_str()),
        ],
    );
    let response = client()
        .post(format!("{api_url}/v1/apps/sync"))
        .header("authorization", bearer())
        .body(json!({ "url": app.url }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "syncing the app");

    let mut order: Vec<Victim> = (0..services.len()).map(Victim::Service).collect();
    order.extend([Victim::Redis, Victim::Nats]);
    order.shuffle(&mut rand::thread_rng());

    let mut torture = Torture::start(Target {
        events: format!("{events_url}/e/{EVENT_KEY}"),
        api: api_url,
        bearer: Some(bearer()),
    });
    let mut self_exits = Vec::new();
    for victim in order.iter().cycle().take(kills) {
        torture.before_kill(&app).await;
        match *victim {
            Victim::Service(n) => {
                services[n].restart();
                torture.after_restart(services[n].baton.pid()).await;
            }
            Victim::Redis => {
                redis.kill_9();
                redis.restart();
            }
            Victim::Nats => {
                nats.kill_9();
                nats.restart();
            }
        }
        // A service that ended by itself (say, on a backend restart) makes
        // its process exit; a supervisor would start it again.
        for service in services.iter_mut() {
            if service.baton.exited() {
                let log = service.baton.log();
                let why: Vec<&str> = log.lines().rev().take(5).collect();
                let exit = format!("{} after {victim:?}: {why:?}", service.name);
                eprintln!("exited by itself: {exit}");
                self_exits.push(exit);
                service.restart();
            }
        }
        if !matches!(victim, Victim::Service(_)) {
            for service in &services {
                torture.after_restart(service.baton.pid()).await;
            }
        }
    }
    let figures = torture.finish(&app, "split deployment").await;
    eprintln!(
        "{figures}; {} baton processes exited by themselves: {self_exits:#?}",
        self_exits.len()
    );
    drop(services);
    // Kept alive until the deployment is gone.
    drop((redis, nats));
}
