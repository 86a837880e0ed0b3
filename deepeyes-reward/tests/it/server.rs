//! A tiny HTTP/1.1 server on loopback that plays an OpenAI-compatible judge, for tests: every
//! connection gets its own thread, every request is recorded, and a handler decides the reply
//! (a JSON body, a status, garbage bytes, a delay, or a dropped connection).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request the server received.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Request {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("request body is JSON")
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the server answers.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// A status and a body sent as JSON.
    Body(u16, String),
    /// A status, extra headers and a body.
    WithHeaders(u16, Vec<(String, String)>, String),
    /// Wait, then answer.
    After(Duration, Box<Reply>),
    /// Close the connection without answering.
    Close,
}

/// A chat completion whose message content is `content`.
pub(crate) fn chat(content: &str) -> Reply {
    let body = serde_json::json!({
        "id": "cmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    });
    Reply::Body(200, body.to_string())
}

/// A model listing.
pub(crate) fn models(ids: &[&str]) -> Reply {
    let data: Vec<_> = ids
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model"}))
        .collect();
    Reply::Body(
        200,
        serde_json::json!({"object": "list", "data": data}).to_string(),
    )
}

type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

struct Shared {
    requests: Mutex<Vec<Request>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    stop: AtomicBool,
}

/// The running server; it stops when dropped.
pub(crate) struct JudgeServer {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl JudgeServer {
    /// Starts a server; `handler` gets each request and the number of requests before it.
    pub(crate) fn start(
        handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let handler: Arc<Handler> = Arc::new(handler);
        let accept_shared = shared.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let shared = accept_shared.clone();
                let handler = handler.clone();
                std::thread::spawn(move || serve(stream, &shared, handler.as_ref()));
            }
        });
        Self {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// A server that answers every chat request with `content` and lists one model.
    pub(crate) fn answering(content: &'static str) -> Self {
        Self::start(move |req, _| {
            if req.path.ends_with("/models") {
                models(&["judge-model"])
            } else {
                chat(content)
            }
        })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub(crate) fn count(&self, path_suffix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path.ends_with(path_suffix))
            .count()
    }

    pub(crate) fn chat_requests(&self) -> usize {
        self.count("/chat/completions")
    }

    pub(crate) fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for JudgeServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
    }
}

/// A URL where nothing listens (connection refused).
pub(crate) fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

fn serve(stream: TcpStream, shared: &Shared, handler: &Handler) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let Some(request) = read_request(&stream) else {
        return;
    };
    let index = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(request.clone());
        requests.len() - 1
    };
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let reply = handler(&request, index);
    respond(stream, reply);
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let (name, value) = (name.trim().to_string(), value.trim().to_string());
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().ok()?;
            }
            headers.push((name, value));
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn respond(mut stream: TcpStream, reply: Reply) {
    match reply {
        Reply::After(wait, then) => {
            std::thread::sleep(wait);
            respond(stream, *then);
        }
        Reply::Close => {
            let _ = stream.shutdown(Shutdown::Both);
        }
        Reply::Body(status, body) => respond(stream, Reply::WithHeaders(status, Vec::new(), body)),
        Reply::WithHeaders(status, headers, body) => {
            let extra: String = headers
                .iter()
                .map(|(name, value)| format!("{name}: {value}\r\n"))
                .collect();
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body.as_bytes());
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Write);
        }
    }
}
