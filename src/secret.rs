//! Handling secrets: comparing them in constant time, keeping them out of
//! log lines and error messages, and reading them from files (so that they
//! need not appear on a command line, where `ps` shows them).

use std::path::Path;

use anyhow::Context;
use subtle::ConstantTimeEq;

/// Whether two secrets are equal, taking the same time wherever they
/// differ (only their lengths may leak).
pub fn secret_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// Whether `candidate` equals any of `secrets`; every one is compared, so
/// the time taken does not say which one matched or how far it matched.
pub fn matches_any(candidate: &str, secrets: &[String]) -> bool {
    secrets
        .iter()
        .fold(false, |found, secret| found | secret_eq(candidate, secret))
}

/// A server URL (or a comma-separated list of them, as NATS takes) with
/// its password, token or `pass=` / `password=` / `token=` parameter
/// replaced by `***`, for log lines and messages.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one_url(url: &str) -> String {
    let mut shown = url.to_string();
    if let Some((scheme, rest)) = url.split_once("://") {
        // The userinfo ends at the last `@` before the query, so that a
        // password holding an unescaped `/` or `@` is hidden whole.
        let query = rest.find(['?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..query].rfind('@') {
            let (userinfo, host_and_path) = (&rest[..at], &rest[at + 1..]);
            let userinfo = match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***"),
                // `nats://<token>@host`: a lone user part is a token.
                None if scheme.starts_with("nats") || scheme == "tls" => "***".to_string(),
                None => userinfo.to_string(),
            };
            shown = format!("{scheme}://{userinfo}@{host_and_path}");
        }
    }
    for name in ["pass=", "password=", "token="] {
        let mut from = 0;
        while let Some(found) = shown[from..].find(name) {
            let start = from + found;
            let boundary = start == 0 || matches!(shown.as_bytes()[start - 1], b'?' | b'&');
            let value = start + name.len();
            let end = shown[value..].find('&').map_or(shown.len(), |i| value + i);
            if boundary {
                shown.replace_range(value..end, "***");
                from = value + 3;
            } else {
                from = value;
            }
        }
    }
    shown
}

/// Reads a secret from a file: its content without the surrounding
/// whitespace (a trailing newline is usual). An empty file is an error.
pub fn read_secret_file(flag: &str, path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        anyhow::bail!("{flag}: {} is empty", path.display());
    }
    Ok(secret.to_string())
}

/// Reads one secret per line (blank lines and `#` comments skipped).
pub fn read_secret_lines(flag: &str, path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    let secrets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect();
    if secrets.is_empty() {
        anyhow::bail!("{flag}: {} holds no key", path.display());
    }
    Ok(secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(url: &str, expected: &str) {
        assert_eq!(redact_url(url), expected);
    }

    #[test]
    fn urls_lose_their_passwords() {
        check("redis://127.0.0.1:6379", "redis://127.0.0.1:6379");
        check(
            "redis://:hunter2@10.0.0.5:6379/0",
            "redis://:***@10.0.0.5:6379/0",
        );
        check(
            "rediss://app:hunter2@cache.internal:6380",
            "rediss://app:***@cache.internal:6380",
        );
        check("redis://app@cache", "redis://app@cache");
        check("nats://s3cret@nats:4222", "nats://***@nats:4222");
        check(
            "nats://u:p@a:4222,nats://u:p@b:4222",
            "nats://u:***@a:4222,nats://u:***@b:4222",
        );
        check(
            "redis+unix:///tmp/redis.sock?db=1&pass=hunter2",
            "redis+unix:///tmp/redis.sock?db=1&pass=***",
        );
        check(
            "redis://h/?password=hunter2&x=1",
            "redis://h/?password=***&x=1",
        );
        // A password holding `@` or `/` is still hidden up to the last `@`.
        check("redis://:a@b@host:1", "redis://:***@host:1");
        check("redis://:a/b@host:1/2", "redis://:***@host:1/2");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(secret_eq("abc", "abc"));
        assert!(!secret_eq("abc", "abd"));
        assert!(!secret_eq("abc", "ab"));
        assert!(!secret_eq("", "a"));
        let keys = vec!["one".to_string(), "two".to_string()];
        assert!(matches_any("two", &keys));
        assert!(!matches_any("three", &keys));
        assert!(!matches_any("x", &[]));
    }

    #[test]
    fn secret_files_are_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "signkey-prod-abcd\n").unwrap();
        assert_eq!(read_secret_file("--f", &path).unwrap(), "signkey-prod-abcd");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_secret_file("--f", &path).is_err());
        std::fs::write(&path, "# keys\nk1\n\nk2\n").unwrap();
        assert_eq!(read_secret_lines("--f", &path).unwrap(), ["k1", "k2"]);
        let missing = read_secret_file("--f", &dir.path().join("nope")).unwrap_err();
        assert!(format!("{missing:#}").contains("--f: cannot read"));
    }
}
