//! `baton runs|events|apps|status`: a client of a running server's REST API
//! (`/v1`). Tables for people, `--json` for scripts, and exit codes scripts
//! can branch on (`ExitKind`). It owns no server code and reads no store.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the server is and how to talk to it (every client command).
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The server's URL.
    #[arg(
        long,
        env = "BATON_URL",
        default_value = "http://127.0.0.1:8288",
        global = true
    )]
    pub url: String,
    /// Print the API's JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    /// File holding the signing key (production servers); else
    /// $BATON_SIGNING_KEY or $INNGEST_SIGNING_KEY.
    #[arg(long, env = "BATON_SIGNING_KEY_FILE", global = true)]
    pub signing_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: RunsCommand,
}

/// Which runs a list or a bulk action is about.
#[derive(Debug, Clone, Default, Args)]
pub struct RunFilterArgs {
    /// Only runs of this function (its full id, e.g. my-app-hello).
    #[arg(long = "function")]
    pub function_id: Option<String>,
    /// Only runs with this status (Queued, Running, Completed, Failed,
    /// Cancelled, Skipped); repeatable for bulk actions.
    #[arg(long)]
    pub status: Vec<String>,
    /// Only runs created at or after this time (RFC 3339, or an age such as
    /// 30m, 2h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// Only runs created before this time (RFC 3339, or an age).
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Runs, newest first.
    List {
        #[command(flatten)]
        filter: RunFilterArgs,
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One run with its steps and what it waits for.
    Show { run_id: String },
    /// Cancels runs: the given ids, or every run matching the filter.
    Cancel(BulkArgs),
    /// Replays runs (a new run from the same events): the given ids, or
    /// every run matching the filter.
    Replay(BulkArgs),
}

#[derive(Debug, Args)]
pub struct BulkArgs {
    /// Run ids; without them, the filter chooses the runs.
    pub run_ids: Vec<String>,
    #[command(flatten)]
    pub filter: RunFilterArgs,
    /// A CEL expression over the triggering event, e.g.
    /// 'event.data.customer == "acme"'.
    #[arg(long = "where")]
    pub expression: Option<String>,
    /// Only say how many runs match.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: EventsCommand,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Sends an event.
    Send {
        /// The event's name, e.g. app/user.created.
        name: String,
        /// Its data, a JSON object.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Its id (deduplicates: one run per function and event id).
        #[arg(long)]
        id: Option<String>,
    },
    /// Events, newest first.
    List {
        /// Only events with this name.
        #[arg(long)]
        name: Option<String>,
        /// How many events.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Debug, Args)]
pub struct AppsArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: AppsCommand,
}

#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// Synced apps.
    List,
    /// Asks the app serving at URL to sync now.
    Sync { app_url: String },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connection: Connection,
}

/// Exit codes (documented in the README): 0 success, 1 any other failure
/// (a server error, some runs of a bulk action failed), 2 bad usage, 3 the
/// server cannot be reached, 4 not found, 5 not authorized, 6 the server
/// refused the request as invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Failure = 1,
    Usage = 2,
    Unreachable = 3,
    NotFound = 4,
    Unauthorized = 5,
    Refused = 6,
}

/// A failure and the exit code it maps to.
#[derive(Debug)]
pub struct ClientError {
    pub kind: ExitKind,
    pub message: String,
}

impl ClientError {
    fn new(kind: ExitKind, message: impl Into<String>) -> ClientError {
        ClientError {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

type ClientResult<T> = Result<T, ClientError>;

/// A client command, ready to run.
pub enum ClientCommand<'a> {
    Runs(&'a RunsArgs),
    Events(&'a EventsArgs),
    Apps(&'a AppsArgs),
    Status(&'a StatusArgs),
}

/// Runs a client command; the error says which exit code to use.
pub fn run(command: ClientCommand<'_>) -> ClientResult<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| ClientError::new(ExitKind::Failure, format!("cannot start: {err}")))?;
    runtime.block_on(async {
        match command {
            ClientCommand::Runs(args) => runs(&Api::new(&args.connection)?, args).await,
            ClientCommand::Events(args) => events(&Api::new(&args.connection)?, args).await,
            ClientCommand::Apps(args) => apps(&Api::new(&args.connection)?, args).await,
            ClientCommand::Status(args) => status(&Api::new(&args.connection)?).await,
        }
    })
}

/// The REST API of one server.
struct Api {
    base: String,
    bearer: Option<String>,
    json: bool,
    http: reqwest::Client,
}

impl Api {
    fn new(connection: &Connection) -> ClientResult<Api> {
        let key = match &connection.signing_key_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|err| {
                        ClientError::new(
                            ExitKind::Usage,
                            format!("cannot read {}: {err}", path.display()),
                        )
                    })?
                    .trim()
                    .to_string(),
            ),
            None => ["BATON_SIGNING_KEY", "INNGEST_SIGNING_KEY"]
                .iter()
                .find_map(|name| std::env::var(name).ok())
                .map(|key| key.trim().to_string()),
        }
        .filter(|key| !key.is_empty());
        // The key travels hashed, as the SDKs send it.
        let bearer = match key {
            Some(key) => Some(crate::sdk::hashed_signing_key(&key).ok_or_else(|| {
                ClientError::new(
                    ExitKind::Usage,
                    "the signing key must be hex, optionally prefixed signkey-<env>-",
                )
            })?),
            None => None,
        };
        let base = connection.url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::new(
                ExitKind::Usage,
                format!("--url must be an http(s) URL, not {base:?}"),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|err| ClientError::new(ExitKind::Failure, err.to_string()))?;
        Ok(Api {
            base,
            bearer,
            json: connection.json,
            http,
        })
    }

    /// Sends a request; answers the JSON body of a 2xx, else the error
    /// mapped to its exit code.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> ClientResult<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(bearer) = &self.bearer {
            request = request.bearer_auth(bearer);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|err| {
            ClientError::new(
                ExitKind::Unreachable,
                format!("cannot reach Baton at {}: {}", self.base, error_chain(&err)),
            )
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let message = value["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(300).collect());
        let kind = match status.as_u16() {
            404 | 410 => ExitKind::NotFound,
            401 | 403 => ExitKind::Unauthorized,
            400..=499 => ExitKind::Refused,
            _ => ExitKind::Failure,
        };
        Err(ClientError::new(kind, format!("{status}: {message}")))
    }

    async fn get(&self, path: &str) -> ClientResult<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> ClientResult<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Prints `value` as JSON when `--json` was given; tells the caller
    /// whether it did.
    fn print_json(&self, value: &Value) -> bool {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
        }
        self.json
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `30m`, `7d`: that long ago; else an RFC 3339 time as given.
fn time_arg(flag: &str, text: &str) -> ClientResult<String> {
    if crate::duration::parse_iso_date(text).is_some() {
        return Ok(text.to_string());
    }
    let age = crate::duration::parse_time_str(text).map_err(|_| {
        ClientError::new(
            ExitKind::Usage,
            format!("{flag} must be an RFC 3339 time or an age like 30m, 2h, 7d, not {text:?}"),
        )
    })?;
    let at = chrono::Utc::now() - chrono::Duration::milliseconds(age.as_millis() as i64);
    Ok(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v)))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!(
            "?{}",
            serde_urlencoded::to_string(pairs).unwrap_or_default()
        )
    }
}

fn path_segment(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.~".contains(c) {
                c.to_string()
            } else {
                c.to_string().bytes().map(|b| format!("%{b:02X}")).collect()
            }
        })
        .collect()
}

/// Prints rows as a table with a header, columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A JSON value cut to one line of at most `max` characters.
fn short(value: &Value, max: usize) -> String {
    let full = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if full.chars().count() <= max {
        full
    } else {
        let cut: String = full.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

async fn runs(api: &Api, args: &RunsArgs) -> ClientResult<()> {
    match &args.command {
        RunsCommand::List { filter, limit } => {
            if filter.status.len() > 1 {
                return Err(ClientError::new(
                    ExitKind::Usage,
                    "runs list takes one --status",
                ));
            }
            let query = query_string(&[
                ("function_id", filter.function_id.clone()),
                ("status", filter.status.first().cloned()),
                (
                    "since",
                    filter
                        .since
                        .as_deref()
                        .map(|t| time_arg("--since", t))
                        .transpose()?,
                ),
                (
                    "until",
                    filter
                        .until
                        .as_deref()
                        .map(|t| time_arg("--until", t))
                        .transpose()?,
                ),
                ("limit", Some(limit.to_string())),
            ]);
            let body = api.get(&format!("/v1/runs{query}")).await?;
            if api.print_json(&body["data"]) {
                return Ok(());
            }
            let rows: Vec<Vec<String>> = body["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|run| {
                    vec![
                        text(&run["run_id"]),
                        text(&run["function_id"]),
                        text(&run["status"]),
                        text(&run["run_started_at"]),
                        text(&run["ended_at"]),
                    ]
                })
                .collect();
            print_table(&["RUN ID", "FUNCTION", "STATUS", "STARTED", "ENDED"], &rows);
            Ok(())
        }
        RunsCommand::Show { run_id } => {
            let body = api
                .get(&format!("/v1/runs/{}", path_segment(run_id)))
                .await?;
            let run = &body["data"];
            if api.print_json(run) {
                return Ok(());
            }
            println!("run       {}", text(&run["run_id"]));
            println!("function  {}", text(&run["function_id"]));
            println!("status    {}", text(&run["status"]));
            println!("started   {}", text(&run["run_started_at"]));
            println!("ended     {}", text(&run["ended_at"]));
            println!("event     {}", text(&run["event_id"]));
            if !run["skip_reason"].is_null() {
                println!("skipped   {}", text(&run["skip_reason"]));
            }
            if !run["output"].is_null() {
                println!("output    {}", short(&run["output"], 200));
            }
            let steps: Vec<Vec<String>> = run["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|step| {
                    vec![
                        text(&step["name"]),
                        text(&step["kind"]),
                        text(&step["attempts"]),
                        text(&step["saved_at"]),
                        short(&step["output"], 60),
                    ]
                })
                .collect();
            if !steps.is_empty() {
                println!();
                print_table(&["STEP", "KIND", "ATTEMPTS", "SAVED", "OUTPUT"], &steps);
            }
            let pauses: Vec<Vec<String>> = run["pauses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|pause| {
                    vec![
                        text(&pause["kind"]),
                        text(&pause["step"]),
                        text(&pause["event"]),
                        text(&pause["expires_at"]),
                    ]
                })
                .collect();
            if !pauses.is_empty() {
                println!();
                print_table(&["WAITING", "STEP", "EVENT", "UNTIL"], &pauses);
            }
            Ok(())
        }
        RunsCommand::Cancel(bulk) => act_on_runs(api, "cancel", bulk).await,
        RunsCommand::Replay(bulk) => act_on_runs(api, "replay", bulk).await,
    }
}

/// `runs cancel|replay`: by ids one at a time, or by filter as a bulk
/// action (preview, confirmation, progress).
async fn act_on_runs(api: &Api, action: &str, args: &BulkArgs) -> ClientResult<()> {
    let filter = &args.filter;
    let has_filter = filter.function_id.is_some()
        || !filter.status.is_empty()
        || filter.since.is_some()
        || filter.until.is_some()
        || args.expression.is_some();
    if !args.run_ids.is_empty() {
        if has_filter || args.dry_run {
            return Err(ClientError::new(
                ExitKind::Usage,
                "give run ids or a filter, not both",
            ));
        }
        let mut results = Vec::new();
        let mut failed = None;
        for run_id in &args.run_ids {
            let path = format!("/v1/runs/{}", path_segment(run_id));
            let result = if action == "cancel" {
                api.call(reqwest::Method::DELETE, &path, None).await
            } else {
                api.post(&format!("{path}/replay"), &json!({})).await
            };
            match result {
                Ok(body) => {
                    if !api.json {
                        match action {
                            "cancel" => println!("{run_id}  {}", text(&body["data"]["status"])),
                            _ => {
                                println!("{run_id}  replayed as {}", text(&body["data"]["run_id"]))
                            }
                        }
                    }
                    results.push(json!({"run_id": run_id, "ok": true, "result": body["data"]}));
                }
                Err(err) => {
                    if !api.json {
                        eprintln!("{run_id}  {err}");
                    }
                    results.push(json!({"run_id": run_id, "ok": false, "error": err.message}));
                    failed.get_or_insert(err.kind);
                }
            }
        }
        api.print_json(&Value::Array(results));
        return match failed {
            Some(kind) => Err(ClientError::new(
                if args.run_ids.len() == 1 {
                    kind
                } else {
                    ExitKind::Failure
                },
                format!("{action} failed for some runs"),
            )),
            None => Ok(()),
        };
    }
    if !has_filter {
        return Err(ClientError::new(
            ExitKind::Usage,
            format!(
                "give run ids, or a filter (--function, --status, --since, --until, --where) \
                 to {action} every run that matches"
            ),
        ));
    }
    let mut request = json!({
        "action": action,
        "function_id": filter.function_id,
        "status": filter.status,
        "since": filter.since.as_deref().map(|t| time_arg("--since", t)).transpose()?,
        "until": filter.until.as_deref().map(|t| time_arg("--until", t)).transpose()?,
        "if": args.expression,
        "dry_run": true,
    });
    let preview = api.post("/v1/runs/bulk", &request).await?["data"].clone();
    let matched = preview["matched"].as_u64().unwrap_or(0);
    if args.dry_run {
        if !api.print_json(&preview) {
            println!("{matched} runs match; {action} would apply to them");
        }
        return Ok(());
    }
    if matched == 0 {
        if !api.print_json(&preview) {
            println!("no runs match");
        }
        return Ok(());
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(ClientError::new(
                ExitKind::Usage,
                format!("{matched} runs match; pass --yes to {action} them"),
            ));
        }
        eprint!("{action} {matched} runs? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(ClientError::new(ExitKind::Failure, "not confirmed"));
        }
    }
    request["dry_run"] = json!(false);
    let started = api.post("/v1/runs/bulk", &request).await?["data"].clone();
    let id = text(&started["id"]);
    let mut progress = started;
    loop {
        if !api.json {
            eprint!(
                "\r{action}: {} of {} done, {} failed",
                progress["done"], progress["matched"], progress["failed"]
            );
        }
        if progress["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        progress = api
            .get(&format!("/v1/runs/bulk/{}", path_segment(&id)))
            .await?["data"]
            .clone();
    }
    if !api.print_json(&progress) {
        eprintln!();
        if let Some(error) = progress["errors"].as_array().and_then(|e| e.first()) {
            eprintln!("first error: {}", text(error));
        }
    }
    if progress["failed"].as_u64().unwrap_or(0) > 0 {
        return Err(ClientError::new(
            ExitKind::Failure,
            format!("{} runs could not be {action}ed", progress["failed"]),
        ));
    }
    Ok(())
}

async fn events(api: &Api, args: &EventsArgs) -> ClientResult<()> {
    match &args.command {
        EventsCommand::Send { name, data, id } => {
            let data: Value = serde_json::from_str(data).map_err(|err| {
                ClientError::new(ExitKind::Usage, format!("--data is not JSON: {err}"))
            })?;
            let mut event = json!({"name": name, "data": data});
            if let Some(id) = id {
                event["id"] = json!(id);
            }
            let body = api.post("/v1/events", &event).await?;
            if !api.print_json(&body) {
                for id in body["ids"].as_array().into_iter().flatten() {
                    println!("{}", text(id));
                }
            }
            Ok(())
        }
        EventsCommand::List { name, limit } => {
            let query = query_string(&[("name", name.clone()), ("limit", Some(limit.to_string()))]);
            let body = api.get(&format!("/v1/events{query}")).await?;
            if api.print_json(&body["data"]) {
                return Ok(());
            }
            let rows: Vec<Vec<String>> = body["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|event| {
                    vec![
                        text(&event["internal_id"]),
                        text(&event["name"]),
                        text(&event["received_at"]),
                        short(&event["data"], 60),
                    ]
                })
                .collect();
            print_table(&["EVENT ID", "NAME", "RECEIVED", "DATA"], &rows);
            Ok(())
        }
    }
}

async fn apps(api: &Api, args: &AppsArgs) -> ClientResult<()> {
    match &args.command {
        AppsCommand::List => {
            let body = api.get("/v1/apps").await?;
            if api.print_json(&body["data"]) {
                return Ok(());
            }
            let rows: Vec<Vec<String>> = body["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|app| {
                    vec![
                        text(&app["id"]),
                        text(&app["url"]),
                        app["functions"].as_array().map_or(0, Vec::len).to_string(),
                        text(&app["synced_at"]),
                        text(&app["last_error"]),
                    ]
                })
                .collect();
            print_table(&["APP", "URL", "FUNCTIONS", "SYNCED", "LAST ERROR"], &rows);
            Ok(())
        }
        AppsCommand::Sync { app_url } => {
            let body = api.post("/v1/apps/sync", &json!({"url": app_url})).await?;
            if !api.print_json(&body["data"]) {
                println!("synced {app_url}");
            }
            Ok(())
        }
    }
}

async fn status(api: &Api) -> ClientResult<()> {
    let body = api.get("/v1/status").await?;
    let data = &body["data"];
    if api.print_json(data) {
        return Ok(());
    }
    println!(
        "baton {} (commit {}) at {}",
        text(&data["version"]),
        text(&data["commit"]),
        api.base
    );
    println!("mode         {}", text(&data["mode"]));
    println!("queue depth  {}", text(&data["queue_depth"]));
    println!("open pauses  {}", text(&data["open_pauses"]));
    println!("store bytes  {}", text(&data["store_bytes"]));
    println!("retention    {}", text(&data["retention"]));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_become_times_and_times_pass_through() {
        assert_eq!(
            time_arg("--since", "2026-01-02T03:04:05Z").unwrap(),
            "2026-01-02T03:04:05Z"
        );
        let since = time_arg("--since", "2h").unwrap();
        assert!(crate::duration::parse_iso_date(&since).is_some(), "{since}");
        let err = time_arg("--since", "yesterday").unwrap_err();
        assert_eq!(err.kind, ExitKind::Usage);
    }

    #[test]
    fn query_strings_and_path_segments_are_escaped() {
        assert_eq!(
            query_string(&[("name", Some("a b&c".into())), ("x", None)]),
            "?name=a+b%26c"
        );
        assert_eq!(query_string(&[("x", None)]), "");
        assert_eq!(path_segment("01K/..?"), "01K%2F..%3F");
    }
}
