//! The binary as a client of a running server (`connect`, `update`, `listen`,
//! `disconnect`, `token`), its one-line errors, and what `serve` says at start.

mod common;

use std::process::{Output, Stdio};

use common::{Server, WAIT, uid, within};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Runs `dolores ARGS…` to the end (at most [`WAIT`]).
async fn run(args: &[&str]) -> Output {
    within(
        &format!("dolores {args:?}"),
        WAIT,
        common::command().args(args).output(),
    )
    .await
    .expect("run dolores")
}

/// Runs a client command against `server`, finding the api key in its data dir.
async fn run_with_data(server: &Server, args: &[&str]) -> Output {
    let data = server.store_dir();
    let data = data.to_str().expect("utf-8 path");
    let mut all = args.to_vec();
    all.extend(["--server", server.addr(), "--data", data]);
    run(&all).await
}

/// Checks a successful run and parses its stdout as one JSON value.
#[track_caller]
fn json_out(output: &Output) -> Value {
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("JSON on stdout ({e}): {output:?}"))
}

/// Checks a failed run: exit code 1 and one line on stderr, `dolores: …`, containing
/// `needle`.
#[track_caller]
fn one_line_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "exit code 1: {output:?}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("dolores: "), "{stderr:?}");
    assert!(stderr.contains(needle), "{needle:?} in {stderr:?}");
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_update_listen_and_disconnect_end_to_end() {
    // No --api-key: the server makes one and keeps it in the data dir, where the client
    // subcommands find it.
    let server = Server::config().no_api_key().start().await;
    let u = uid("cli");
    let answer = json_out(&run_with_data(&server, &["connect", &u, ":cli"]).await);
    assert_eq!(answer, json!({"uid": u, "tracks": [":cli"]}));

    let mut listen = common::command()
        .args(["listen", &u, "--server", &server.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dolores listen");
    let mut lines = BufReader::new(listen.stdout.take().expect("stdout")).lines();

    let mut ids = Vec::new();
    for args in [
        &["update", ":cli", r#"{"a":1}"#][..],
        &["update", ":cli", "hello world"],
        &["update", ":cli", r#"{"a":1}"#, "--string"],
        &["update", ":cli", "42"],
    ] {
        let answer = json_out(&run_with_data(&server, args).await);
        ids.push(answer["id"].as_str().expect("an id").to_owned());
    }
    let expected = [
        json!({"a": 1}),
        json!("hello world"),
        json!(r#"{"a":1}"#),
        json!(42),
    ];
    for (id, message) in ids.iter().zip(expected) {
        let line = within("a line from dolores listen", WAIT, lines.next_line())
            .await
            .expect("read")
            .expect("a line");
        let event: Value = serde_json::from_str(&line).expect("one JSON line per event");
        assert_eq!(
            event,
            json!({"id": id, "track": ":cli", "message": message})
        );
    }

    let answer = json_out(&run_with_data(&server, &["disconnect", &u, ":cli"]).await);
    assert_eq!(answer, json!({"uid": u, "tracks": []}));
    // Forgetting the listener ends its stream; `listen` then finds it unknown and stops
    // with an error.
    let answer = json_out(&run_with_data(&server, &["disconnect", &u]).await);
    assert_eq!(answer, json!({"uid": u, "tracks": []}));
    let status = within("dolores listen to stop", WAIT, listen.wait())
        .await
        .expect("wait");
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(
        &mut listen.stderr.take().expect("stderr"),
        &mut stderr,
    )
    .await
    .expect("stderr");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("dolores: ") && last.contains("unknown_listener"),
        "{stderr:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_prints_a_reset_and_resumes_from_last_event_id() {
    let server = Server::start_args(&["--max-stored-messages", "2"]).await;
    let u = uid("clireset");
    server.connect(&u, ":r").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(server.publish(":r", json!(i)).await);
    }
    let spawn = |extra: Vec<String>| {
        common::command()
            .args(["listen", &u, "--server", server.addr()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let mut reset = spawn(vec![]);
    let mut lines = BufReader::new(reset.stdout.take().expect("stdout")).lines();
    let line = within("a reset line", WAIT, lines.next_line())
        .await
        .expect("read")
        .expect("line");
    let event: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(event, json!({"id": ids[3].to_string(), "reset": true}));
    reset.kill().await.expect("kill");

    let mut resumed = spawn(vec!["--last-event-id".into(), ids[2].to_string()]);
    let mut lines = BufReader::new(resumed.stdout.take().expect("stdout")).lines();
    let line = within("an event line", WAIT, lines.next_line())
        .await
        .expect("read")
        .expect("line");
    let event: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(
        event,
        json!({"id": ids[3].to_string(), "track": ":r", "message": 3})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_settings_come_from_dolores_environment_variables() {
    let server = Server::start().await;
    let u = uid("env");
    let output = within(
        "dolores connect",
        WAIT,
        common::command()
            .args(["connect", &u, ":env"])
            .env("DOLORES_LISTEN", server.addr())
            .env("DOLORES_API_KEY", server.api_key())
            .output(),
    )
    .await
    .expect("run");
    assert_eq!(json_out(&output)["tracks"], json!([":env"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_one_line_and_exit_1() {
    let server = Server::start().await;
    let (addr, key) = (server.addr(), server.api_key());
    let with = |args: &[&'static str]| {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.extend(["--server".into(), addr.to_owned()]);
        if args[0] != "listen" {
            all.extend(["--api-key".into(), key.to_owned()]);
        }
        all
    };
    let run_owned = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args).await
    };
    one_line_error(&run_owned(with(&["connect", "bad", ":t"])).await, "bad_uid");
    one_line_error(
        &run_owned(with(&["connect", "abcdefgh", "bad track"])).await,
        "bad_track",
    );
    one_line_error(&run_owned(with(&["update", "", "m"])).await, "bad_track");
    one_line_error(
        &run_owned(with(&["disconnect", "nobody-here"])).await,
        "unknown_listener",
    );
    one_line_error(
        &run_owned(with(&["listen", "nobody-here"])).await,
        "unknown_listener",
    );
    one_line_error(
        &run_owned(with(&["token", "abcdefgh"])).await,
        "no_token_secret",
    );
    one_line_error(&run(&["token", "bad", "--token-secret", "s"]).await, "uid");
    one_line_error(
        &run(&["update", ":t", "m", "--server", addr, "--api-key", "wrong"]).await,
        "wrong_api_key",
    );

    // Unreachable server.
    let nowhere = format!("127.0.0.1:{}", closed_port());
    let output = run(&["update", ":t", "m", "--server", &nowhere, "--api-key", "k"]).await;
    one_line_error(&output, "cannot reach");
    one_line_error(&output, "onnection refused");
    let output = run(&[
        "connect",
        "abcdefgh",
        ":t",
        "--server",
        &nowhere,
        "--api-key",
        "k",
    ])
    .await;
    one_line_error(&output, "cannot reach");

    // No key given and none in the data dir.
    let empty = tempfile::tempdir().expect("temp dir");
    let data = empty.path().to_str().expect("utf-8");
    let output = run(&["update", ":t", "m", "--server", addr, "--data", data]).await;
    one_line_error(&output, "no api key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_non_loopback_address_without_an_api_key() {
    let output = run(&["serve", "--listen", "0.0.0.0:0", "--memory"]).await;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("dolores: "), "{stderr:?}");
    assert!(
        last.contains("api key") || last.contains("api-key"),
        "{stderr:?}"
    );
    assert!(
        output.stdout.is_empty(),
        "it never said it was listening: {output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_fails_in_one_line_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = run(&["serve", "--listen", &addr, "--memory", "--api-key", "k"]).await;
    one_line_error(&output, "cannot listen on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_makes_an_api_key_on_loopback_keeps_it_private_and_reuses_it() {
    let mut server = Server::config().no_api_key().start().await;
    let key = server.api_key().to_owned();
    assert!(key.len() >= 32, "a long random key: {key:?}");
    let file = server.store_dir().join("api-key");
    let stored = std::fs::read_to_string(&file).expect("the key file");
    assert_eq!(stored.trim(), key);
    assert!(
        server.stdout_lines()[1].contains(file.to_str().expect("utf-8")),
        "{:?}",
        server.stdout_lines()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "only the owner may read the key: {mode:o}");
    }
    server.publish(":k", json!(1)).await;
    assert!(server.terminate().await.success());
    server.restart().await;
    assert_eq!(server.api_key(), key, "the same key after a restart");
    server.publish(":k", json!(2)).await;

    // In memory the key is only printed.
    let memory = Server::config().memory().no_api_key().start().await;
    assert!(
        memory.stdout_lines()[1].starts_with("api key: "),
        "{:?}",
        memory.stdout_lines()
    );
    assert_ne!(memory.api_key(), key);
    memory.publish(":k", json!(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_subcommands_name_the_server_with_server_or_dolores_server() {
    let server = Server::start().await;
    let key = server.api_key();
    let u = uid("server");
    // A URL, as `dolores bench` and the Python client take it.
    let url = server.url();
    let answer = json_out(&run(&["connect", &u, ":a", "--server", &url, "--api-key", key]).await);
    assert_eq!(answer["tracks"], json!([":a"]));
    // host:port.
    let answer = json_out(
        &run(&[
            "connect",
            &u,
            ":b",
            "--server",
            server.addr(),
            "--api-key",
            key,
        ])
        .await,
    );
    assert_eq!(answer["tracks"], json!([":a", ":b"]));
    // DOLORES_SERVER, as for the Python client.
    let output = within(
        "dolores update",
        WAIT,
        common::command()
            .args(["update", ":a", "hi"])
            .env("DOLORES_SERVER", &url)
            .env("DOLORES_API_KEY", key)
            .output(),
    )
    .await
    .expect("run");
    assert!(json_out(&output)["id"].is_string(), "{output:?}");
    // --listen, what these commands took before, still works for old scripts.
    let answer = json_out(
        &run(&[
            "disconnect",
            &u,
            ":a",
            "--listen",
            server.addr(),
            "--api-key",
            key,
        ])
        .await,
    );
    assert_eq!(answer["tracks"], json!([":b"]));
    // A flag beats the variable.
    let nowhere = format!("127.0.0.1:{}", closed_port());
    let output = within(
        "dolores connect",
        WAIT,
        common::command()
            .args(["connect", &u, ":c", "--server", &url, "--api-key", key])
            .env("DOLORES_SERVER", &nowhere)
            .output(),
    )
    .await
    .expect("run");
    assert_eq!(json_out(&output)["tracks"], json!([":b", ":c"]));
    // A config file's `server`, else the address in its `listen` (the server's own file).
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("dolores.toml");
    for line in [
        format!("server = \"{url}\""),
        format!("listen = \"{}\"", server.addr()),
    ] {
        std::fs::write(&config, format!("{line}\napi_key = \"{key}\"\n")).expect("write");
        let config = config.to_str().expect("utf-8");
        let answer = json_out(&run(&["connect", &u, ":d", "--config", config]).await);
        assert_eq!(answer["tracks"], json!([":b", ":c", ":d"]), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_key_says_where_it_came_from() {
    // `dolores serve --api-key …` run where an earlier server left its generated key in
    // ./dolores-data/api-key: the client subcommands run there pick the stale key up.
    let server = Server::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("dolores-data")).expect("mkdir");
    std::fs::write(dir.path().join("dolores-data/api-key"), "stale-key\n").expect("write");
    let in_dir = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = common::command();
        command
            .current_dir(dir.path())
            .args(args)
            .args(["--server", server.addr()]);
        for (key, value) in env {
            command.env(key, value);
        }
        async move {
            within("dolores update", WAIT, command.output())
                .await
                .expect("run")
        }
    };
    let output = in_dir(&["update", ":t", "m"], &[]).await;
    one_line_error(&output, "wrong_api_key");
    one_line_error(
        &output,
        "the key came from ./dolores-data/api-key; pass --api-key or set DOLORES_API_KEY",
    );

    let output = in_dir(&["update", ":t", "m"], &[("DOLORES_API_KEY", "wrong")]).await;
    one_line_error(&output, "the key came from DOLORES_API_KEY)");
    let output = in_dir(&["connect", "abcdefgh", ":t", "--api-key", "wrong"], &[]).await;
    one_line_error(&output, "the key came from --api-key)");
    let config = dir.path().join("dolores.toml");
    std::fs::write(&config, "api_key = \"wrong\"\n").expect("write");
    let config = config.to_str().expect("utf-8");
    let output = in_dir(&["token", "abcdefgh", "--config", config], &[]).await;
    one_line_error(
        &output,
        &format!("the key came from api_key in {config}; pass --api-key"),
    );

    // With the right key the same command works.
    let output = in_dir(
        &["update", ":t", "m"],
        &[("DOLORES_API_KEY", server.api_key())],
    )
    .await;
    assert!(json_out(&output)["id"].is_string());
}

/// `dolores ARGS… --help`.
async fn help(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--help");
    let output = run(&all).await;
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The long options a `--help` lists, like `--api-key`.
fn help_flags(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("-h, ").unwrap_or(line);
            let line =
                line.split_once(", ").map_or(
                    line,
                    |(short, long)| {
                        if short.len() == 2 { long } else { line }
                    },
                );
            line.starts_with("--")
                .then(|| line.split([' ', '=']).next().unwrap_or_default().to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_help_lists_only_the_client_options() {
    for (command, own) in [
        ("update", &["--string", "--api-key", "--data"][..]),
        ("connect", &["--api-key", "--data"]),
        ("disconnect", &["--api-key", "--data"]),
        ("listen", &["--token", "--last-event-id"]),
        (
            "token",
            &["--track", "--ttl", "--token-secret", "--api-key", "--data"],
        ),
        ("track", &["--listeners", "--online", "--api-key", "--data"]),
        ("history", &["--after", "--api-key", "--data"]),
    ] {
        let text = help(&[command]).await;
        let mut expected: Vec<&str> = own.to_vec();
        expected.extend(["--server", "--config", "--help"]);
        let mut listed = help_flags(&text);
        listed.sort();
        expected.sort_unstable();
        assert_eq!(listed, expected, "dolores {command} --help:\n{text}");
        assert!(text.contains("DOLORES_SERVER"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dolores_help_lists_what_the_readme_says() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let top = help(&[]).await;
    // "the client subcommands are `dolores update | connect | … | token`"
    let list = readme
        .split("`dolores update |")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("the README lists the client subcommands");
    let mut commands: Vec<&str> = list.split('|').map(str::trim).collect();
    commands.extend(["update", "serve", "bench"]);
    for command in commands {
        assert!(
            top.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "`dolores --help` lists {command}:\n{top}"
        );
    }
    // What the README says `dolores --help` and `dolores serve --help` show.
    assert!(
        readme.contains("`dolores serve --help` lists them"),
        "the README says where the settings are listed"
    );
    assert!(
        top.contains("`dolores serve --help` lists the server's settings"),
        "{top}"
    );
    // Every row of the settings tables: a server setting in `serve --help`, a client
    // one (said so in its last cell) in the client commands' help.
    let serve = help_flags(&help(&["serve"]).await);
    let update = help_flags(&help(&["update"]).await);
    let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `--")).collect();
    assert!(rows.len() >= 18, "{rows:?}");
    for row in rows {
        let flag = row.split('`').nth(1).expect("a flag");
        let listed = if row.contains("client subcommands only") {
            &update
        } else {
            &serve
        };
        assert!(listed.iter().any(|f| f == flag), "{flag} in --help");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_says_why_it_cannot_reach_the_server() {
    let nowhere = format!("127.0.0.1:{}", closed_port());
    let mut listen = common::command()
        .args(["listen", "abcdefgh", "--server", &nowhere])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dolores listen");
    let mut lines = BufReader::new(listen.stderr.take().expect("stderr")).lines();
    let line = within("a line from dolores listen", WAIT, lines.next_line())
        .await
        .expect("read")
        .expect("a line");
    assert!(
        line.starts_with(&format!("dolores: cannot reach http://{nowhere}"))
            && line.contains("onnection refused")
            && line.ends_with("; retrying"),
        "{line:?}"
    );
    listen.kill().await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_has_no_colours_when_stderr_is_not_a_terminal() {
    // An empty NO_COLOR counts as unset (no-color.org), so colours are up to the server.
    let mut server = Server::config().memory().env("NO_COLOR", "").start().await;
    // Answering means it runs its loop, SIGTERM handler included.
    server.stats().await;
    assert!(server.terminate().await.success());
    let log = common::eventually("the shutdown lines in the log", WAIT, || {
        let log = server.stderr_text();
        std::future::ready(log.contains("bye").then_some(log))
    })
    .await;
    assert!(!log.contains('\u{1b}'), "no escape codes: {log:?}");
}

/// Runs a client command against `server` with its api key.
async fn run_keyed(server: &Server, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--server", server.addr(), "--api-key", server.api_key()]);
    run(&all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_and_history_print_a_tracks_counts_listeners_and_messages() {
    let server = Server::start_args(&["--max-stored-messages", "3"]).await;
    let (online, offline) = (uid("cli-on"), uid("cli-off"));
    server.connect(&online, "rooms/7").await;
    server.connect(&offline, "rooms/7").await;
    let _stream = server.listen(&online).await;
    let output = run_keyed(&server, &["track", "rooms/7"]).await;
    assert_eq!(
        json_out(&output),
        json!({"track": "rooms/7", "subscribers": 2, "online": 1})
    );
    let lines = |output: &Output| -> Vec<Value> {
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    };
    let listed = lines(&run_keyed(&server, &["track", "rooms/7", "--listeners", "--online"]).await);
    assert_eq!(listed.len(), 2, "the counts, then one listener: {listed:?}");
    assert_eq!(
        (&listed[1]["uid"], &listed[1]["online"]),
        (&json!(online), &json!(true))
    );
    let ids: Vec<u64> = {
        let mut ids = Vec::new();
        for n in 0..4 {
            ids.push(server.publish("rooms/7", json!(n)).await);
        }
        ids
    };
    let output = run_keyed(&server, &["history", "rooms/7"]).await;
    let kept: Vec<Value> = (1..4)
        .map(|n| json!({"id": ids[n].to_string(), "track": "rooms/7", "message": n}))
        .collect();
    assert_eq!(lines(&output), kept);
    assert!(output.stderr.is_empty(), "{output:?}");
    let after = ids[0].to_string();
    let output = run_keyed(&server, &["history", "rooms/7", "--after", &after]).await;
    assert_eq!(lines(&output), kept, "nothing after the first was deleted");
    let output = run_keyed(&server, &["history", "rooms/7", "--after", "0"]).await;
    assert_eq!(lines(&output), kept);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("reset"),
        "{output:?}"
    );
    one_line_error(
        &run_keyed(&server, &["history", "two words"]).await,
        "bad_track",
    );
}
