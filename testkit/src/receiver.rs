//! A scripted HTTP receiver and an SMTP sink for delivery tests: plain std
//! sockets on 127.0.0.1, one thread per connection, everything received
//! kept for the test to inspect.
//!
//! The receiver answers requests in order from a script ([`Reply`]), then
//! with 200 once the script is used up. [`Reply::Hang`] holds the
//! connection without answering, so the client's timeout fires.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Answer with this status (and extra headers).
    Status(u16, Vec<(String, String)>),
    /// Say nothing for this long, then close the connection.
    Hang(Duration),
}

impl Reply {
    /// A bare status.
    pub fn status(code: u16) -> Reply {
        Reply::Status(code, Vec::new())
    }
}

/// A request as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method and path, e.g. `POST /hook`.
    pub line: String,
    /// Headers, names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
    /// What the receiver answered (`None`: it hung).
    pub answered: Option<u16>,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct State {
    script: Vec<Reply>,
    requests: Vec<Request>,
}

/// The HTTP receiver; stops when dropped.
pub struct HttpReceiver {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl HttpReceiver {
    /// Starts a receiver on a free port answering with `script`, then 200.
    pub fn start(script: Vec<Reply>) -> HttpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            script: script.into_iter().rev().collect(),
            requests: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (s, st) = (s.clone(), st.clone());
                        std::thread::spawn(move || serve(stream, &s, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HttpReceiver { addr, state, stop }
    }

    /// Replaces what is left of the script.
    pub fn set_script(&self, script: Vec<Reply>) {
        self.state.lock().unwrap().script = script.into_iter().rev().collect();
    }

    /// `http://127.0.0.1:PORT/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Waits until `n` requests arrived (or `timeout`); returns them.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.requests();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_head(reader: &mut BufReader<TcpStream>) -> Option<(String, BTreeMap<String, String>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let first = line.trim_end().to_owned();
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    Some((first, headers))
}

fn serve(stream: TcpStream, state: &Mutex<State>, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    while !stop.load(Ordering::Relaxed) {
        let Some((line, headers)) = read_head(&mut reader) else {
            return;
        };
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let reply = state
            .lock()
            .unwrap()
            .script
            .pop()
            .unwrap_or(Reply::status(200));
        let answered = match &reply {
            Reply::Status(code, _) => Some(*code),
            Reply::Hang(_) => None,
        };
        state.lock().unwrap().requests.push(Request {
            line,
            headers,
            body,
            answered,
        });
        match reply {
            Reply::Hang(d) => {
                std::thread::sleep(d);
                return;
            }
            Reply::Status(code, extra) => {
                let mut head = format!("HTTP/1.1 {code} Scripted\r\ncontent-length: 0\r\n");
                for (k, v) in extra {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                if writer.write_all(head.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

/// An email as the SMTP sink received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// `MAIL FROM` address.
    pub from: String,
    /// `RCPT TO` addresses.
    pub to: Vec<String>,
    /// The DATA section (headers and body), dot-unstuffed.
    pub data: String,
}

/// A minimal SMTP server that accepts every message.
pub struct SmtpSink {
    addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
    stop: Arc<AtomicBool>,
}

impl SmtpSink {
    /// Starts on a free port.
    pub fn start() -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let mails = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, st) = (mails.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let m = m.clone();
                        std::thread::spawn(move || {
                            let _ = smtp_session(stream, &m);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        SmtpSink { addr, mails, stop }
    }

    /// Host and port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until `n` mails arrived (or `timeout`); returns them.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.mails.lock().unwrap().clone();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn smtp_session(stream: TcpStream, mails: &Mutex<Vec<Mail>>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    w.write_all(b"220 flowcap-test-sink ESMTP\r\n")?;
    let (mut from, mut to) = (String::new(), Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_owned();
        let upper = cmd.to_ascii_uppercase();
        let addr = |s: &str| {
            s.split_once(':')
                .map(|x| x.1.trim().trim_matches(['<', '>']).to_owned())
        };
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            w.write_all(b"250-flowcap-test-sink\r\n250 8BITMIME\r\n")?;
        } else if upper.starts_with("MAIL FROM") {
            from = addr(&cmd).unwrap_or_default();
            to.clear();
            w.write_all(b"250 OK\r\n")?;
        } else if upper.starts_with("RCPT TO") {
            to.push(addr(&cmd).unwrap_or_default());
            w.write_all(b"250 OK\r\n")?;
        } else if upper == "DATA" {
            w.write_all(b"354 go ahead\r\n")?;
            let mut data = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                data.push_str(
                    line.strip_prefix('.')
                        .filter(|_| line.starts_with(".."))
                        .unwrap_or(&line),
                );
            }
            mails.lock().unwrap().push(Mail {
                from: from.clone(),
                to: to.clone(),
                data,
            });
            w.write_all(b"250 queued\r\n")?;
        } else if upper == "QUIT" {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 OK\r\n")?;
        }
    }
}
