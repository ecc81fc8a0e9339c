//! Submit, status, logs and delete against a fake Kubernetes API server: a small HTTP
//! server in the test that keeps the applied objects, makes the pods an indexed Job
//! would, serves their logs, and records every request. It serves the core and batch
//! APIs only, so a Volcano job is refused before anything is submitted.
#![cfg(feature = "k8s")]

use serde_json::{json, Value};
use shoal_launch::kube_api::Cluster;
use shoal_launch::spec::JobSpec;
use shoal_launch::{objects, Plan};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    /// Collection path (`/apis/batch/v1/namespaces/ml/jobs`) -> name -> object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (method, path with query, content type) of every request.
    log: Vec<(String, String, String)>,
}

type Shared = Arc<Mutex<State>>;

fn status(code: u16, reason: &str, msg: &str) -> (u16, String) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": msg, "reason": reason, "code": code})
        .to_string(),
    )
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn selected(o: &Value, selector: &Option<(String, String)>) -> bool {
    match selector {
        None => true,
        Some((k, v)) => o.pointer("/metadata/labels").and_then(|l| l.get(k)) == Some(&json!(v)),
    }
}

/// The pods the Job controller would have made for the stored batch Jobs.
fn pods(st: &State, ns: &str) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(jobs) = st
        .objects
        .get(&format!("/apis/batch/v1/namespaces/{ns}/jobs"))
    {
        for (name, j) in jobs {
            let n = j
                .pointer("/spec/completions")
                .and_then(Value::as_u64)
                .unwrap_or(1);
            let labels = j
                .pointer("/spec/template/metadata/labels")
                .cloned()
                .unwrap();
            for i in 0..n {
                out.push(json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("{name}-{i}-x7k2p"), "namespace": ns, "labels": labels},
                    "spec": {"containers": []},
                    "status": {"phase": "Running"}}));
            }
        }
    }
    out
}

fn handle(st: &Shared, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let selector = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
        .map(decode)
        .and_then(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        });
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Discovery of an API group: only batch/v1 is there.
    if method == "GET" && parts[0] == "apis" && parts.len() == 3 {
        let gv = format!("{}/{}", parts[1], parts[2]);
        if gv != "batch/v1" {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        return (200, json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": []}).to_string());
    }
    let base = match parts[0] {
        "api" => 2,
        _ => 3,
    };
    if parts.len() < base + 3 || parts[base] != "namespaces" {
        return status(404, "NotFound", "no such path");
    }
    if parts[0] == "apis" && parts[1] != "batch" {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let ns = parts[base + 1];
    let collection = parts[..base + 3].join("/");
    let collection = format!("/{collection}");
    let name = parts.get(base + 3).copied();
    let mut st = st.lock().unwrap();
    let plural = parts[base + 2];
    match (method, name, parts.get(base + 4).copied()) {
        ("PATCH", Some(n), None) => {
            let mut obj: Value = serde_json::from_slice(body).unwrap();
            if plural == "jobs" {
                let c = obj
                    .pointer("/spec/completions")
                    .cloned()
                    .unwrap_or(json!(1));
                obj["status"] = json!({"active": c});
            }
            st.objects
                .entry(collection)
                .or_default()
                .insert(n.to_string(), obj.clone());
            (200, obj.to_string())
        }
        ("GET", None, None) => {
            let items: Vec<Value> = if plural == "pods" {
                pods(&st, ns)
            } else {
                st.objects
                    .get(&collection)
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default()
            };
            let items: Vec<Value> = items
                .into_iter()
                .filter(|o| selected(o, &selector))
                .collect();
            (200, json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}).to_string())
        }
        ("GET", Some(n), Some("log")) => {
            let tail = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("tailLines="))
                .unwrap_or("all");
            (200, format!("log of {n} (tail {tail})\n"))
        }
        ("DELETE", Some(n), None) => {
            match st.objects.get_mut(&collection).and_then(|m| m.remove(n)) {
                Some(o) => (200, o.to_string()),
                None => status(404, "NotFound", &format!("{n} not found")),
            }
        }
        _ => status(405, "MethodNotAllowed", "not in this fake"),
    }
}

fn serve(st: Shared, stream: TcpStream) {
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut it = line.split_whitespace();
        let (method, target) = (
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
        );
        let (mut len, mut ctype) = (0usize, String::new());
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap(),
                "content-type" => ctype = v.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        st.lock()
            .unwrap()
            .log
            .push((method.clone(), target.clone(), ctype));
        let (code, text) = handle(&st, &method, &target, &body);
        let ct = if target.contains("/log") {
            "text/plain"
        } else {
            "application/json"
        };
        let resp = format!(
            "HTTP/1.1 {code} X\r\ncontent-type: {ct}\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn fake() -> (String, Shared) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let st: Shared = Arc::default();
    let s2 = st.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let s = s2.clone();
            std::thread::spawn(move || serve(s, c));
        }
    });
    (url, st)
}

fn spec(scheduler: &str) -> JobSpec {
    toml::from_str(&format!(
        "name = \"demo\"\nnamespace = \"ml\"\nscheduler = \"{scheduler}\"\nimage = \"shoal:cpu\"\nkind = \"ctr\"\nconfig = \"c.toml\"\nworkers = 2\nps = 1\n[data]\nclaim = \"d\"\n"
    ))
    .unwrap()
}

#[test]
fn submit_follow_and_delete_a_job() {
    let (url, st) = fake();
    let c = Cluster::at(&url).unwrap();
    let s = spec("kubernetes");
    let objs = objects(&Plan {
        spec: &s,
        config_toml: "x = 1\n",
        ps_pods: 1,
        token: "t",
        tls: None,
        max_restarts: 0,
    });
    let applied = c.apply(&objs).unwrap();
    assert_eq!(
        applied,
        [
            "Secret/demo-token",
            "ConfigMap/demo-config",
            "Service/demo",
            "Job.batch/demo-coordinator",
            "Job.batch/demo-worker",
            "Job.batch/demo-ps"
        ]
    );
    {
        let st = st.lock().unwrap();
        let patches: Vec<&(String, String, String)> =
            st.log.iter().filter(|r| r.0 == "PATCH").collect();
        assert_eq!(patches.len(), 6);
        for (_, target, ctype) in &patches {
            // Server-side apply, owned by the field manager "shoal".
            assert_eq!(ctype, "application/apply-patch+yaml");
            assert!(
                target.contains("fieldManager=shoal") && target.contains("force=true"),
                "{target}"
            );
        }
        assert!(patches[0]
            .1
            .starts_with("/api/v1/namespaces/ml/secrets/demo-token"));
        assert!(patches[4]
            .1
            .starts_with("/apis/batch/v1/namespaces/ml/jobs/demo-worker"));
        // What the server holds is what was generated.
        assert_eq!(
            st.objects["/api/v1/namespaces/ml/configmaps"]["demo-config"],
            objs[1]
        );
    }
    let status = c.status("ml", "demo").unwrap();
    let owners: Vec<(&str, &str)> = status
        .owners
        .iter()
        .map(|(k, n, _)| (k.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        owners,
        [
            ("Job.batch", "demo-coordinator"),
            ("Job.batch", "demo-ps"),
            ("Job.batch", "demo-worker")
        ]
    );
    assert!(
        status.owners[2].2.starts_with("2 active"),
        "{:?}",
        status.owners
    );
    let roles: Vec<&str> = status.pods.iter().map(|p| p.role.as_str()).collect();
    assert_eq!(roles, ["coordinator", "ps", "worker", "worker"]);
    assert!(status
        .render()
        .contains("pod demo-worker-1-x7k2p (worker): Running"));
    // Another job's objects are not this job's.
    assert!(c.status("ml", "other").unwrap().pods.is_empty());

    let logs = c.logs("ml", "demo", Some(20)).unwrap();
    for p in &status.pods {
        assert!(
            logs.contains(&format!(
                "==> {} <==\nlog of {} (tail 20)\n",
                p.name, p.name
            )),
            "{logs}"
        );
    }

    let gone = c.delete("ml", "demo").unwrap();
    assert_eq!(gone.len(), 6, "{gone:?}");
    assert!(st.lock().unwrap().objects.values().all(|m| m.is_empty()));
    assert!(c
        .status("ml", "demo")
        .unwrap()
        .render()
        .contains("no objects"));
    // Deleting again finds nothing, and is no error.
    assert!(c.delete("ml", "demo").unwrap().is_empty());
}

#[test]
fn a_scheduler_the_cluster_lacks_is_refused_before_anything_is_submitted() {
    let (url, st) = fake();
    let c = Cluster::at(&url).unwrap();
    for sched in ["volcano", "kubeflow"] {
        let s = spec(sched);
        let objs = objects(&Plan {
            spec: &s,
            config_toml: "x = 1\n",
            ps_pods: 1,
            token: "t",
            tls: None,
            max_restarts: 0,
        });
        let e = c.apply(&objs).unwrap_err().to_string();
        assert!(
            e.contains("does not serve") && e.contains("nothing was submitted"),
            "{e}"
        );
    }
    assert!(st.lock().unwrap().log.iter().all(|r| r.0 == "GET"));
    // An API server that is not there (its port refuses connections): a clear error.
    let (_held, port) = refusing_port();
    assert_eq!(
        TcpStream::connect(("127.0.0.1", port)).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let c = Cluster::at(&format!("http://127.0.0.1:{port}")).unwrap();
    let e = c.status("ml", "demo").unwrap_err().to_string();
    assert!(e.contains("kubernetes"), "{e}");
}

/// A loopback port that refuses every connection, held (while the descriptor lives) so
/// that nothing else can take it: a socket bound to it that never listens, which the
/// kernel answers with a reset, as for a server that is not there.
fn refusing_port() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::{AsRawFd, FromRawFd};
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned here (closed by the OwnedFd), with
    // fully initialised address structures of the stated sizes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut a: libc::sockaddr_in = std::mem::zeroed();
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let sa = &mut a as *mut libc::sockaddr_in as *mut libc::sockaddr;
        let r = libc::bind(fd.as_raw_fd(), sa, len);
        assert!(r == 0, "bind: {}", std::io::Error::last_os_error());
        let mut got = len;
        let r = libc::getsockname(fd.as_raw_fd(), sa, &mut got);
        assert!(r == 0, "getsockname: {}", std::io::Error::last_os_error());
        (fd, u16::from_be(a.sin_port))
    }
}
