//! The workload processes of the test world.
//!
//! `palisade-testbed serve --tcp 443,8080 --udp 53` answers every TCP
//! connection and UDP datagram with `pong`. `palisade-testbed probe tcp|udp
//! ADDR PORT [--timeout-ms N]` tries once and prints one word, with the same
//! word as its exit status: `ok` (0), `eperm` (2: refused by the local
//! kernel, as Palisade's egress hook does), `refused` (3), `timeout` (4),
//! `error` (5). `palisade-testbed flood ADDR PORT COUNT` tries COUNT TCP
//! connects back to back and prints how many failed with EPERM.
use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

fn usage() -> ! {
    eprintln!(
        "usage: palisade-testbed serve [--tcp P,P..] [--udp P,P..] | probe tcp|udp ADDR PORT [--timeout-ms N]"
    );
    std::process::exit(64);
}

fn ports(list: &str) -> Vec<u16> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or_else(|_| usage()))
        .collect()
}

fn serve(args: &[String]) {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tcp" => tcp = ports(it.next().unwrap_or_else(|| usage())),
            "--udp" => udp = ports(it.next().unwrap_or_else(|| usage())),
            _ => usage(),
        }
    }
    let mut threads = Vec::new();
    for port in tcp {
        // `[::]` accepts IPv4 too (v4-mapped), so one socket serves both families.
        let listener = TcpListener::bind(("::", port)).unwrap_or_else(|e| {
            eprintln!("bind tcp {port}: {e}");
            std::process::exit(1)
        });
        threads.push(std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = [0u8; 64];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"pong");
            }
        }));
    }
    for port in udp {
        let socket = UdpSocket::bind(("::", port)).unwrap_or_else(|e| {
            eprintln!("bind udp {port}: {e}");
            std::process::exit(1)
        });
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(b"pong", from);
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    // Park forever (the test world kills us by pid).
    loop {
        std::thread::park();
    }
}

enum Outcome {
    Ok,
    Eperm,
    Refused,
    Timeout,
    Error(String),
}

fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::PermissionDenied => Outcome::Eperm,
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        _ if e.raw_os_error() == Some(libc::EPERM) => Outcome::Eperm,
        _ => Outcome::Error(e.to_string()),
    }
}

fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    if let Err(e) = stream.write_all(b"ping") {
        return classify(&e);
    }
    let mut buf = [0u8; 4];
    match stream.read_exact(&mut buf) {
        Ok(()) if &buf == b"pong" => Outcome::Ok,
        Ok(()) => Outcome::Error("unexpected reply".into()),
        Err(e) => classify(&e),
    }
}

fn probe_udp(addr: SocketAddr, timeout: Duration) -> Outcome {
    let bind: SocketAddr = match addr.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap_or_else(|_| usage()),
        IpAddr::V6(_) => "[::]:0".parse().unwrap_or_else(|_| usage()),
    };
    let socket = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let _ = socket.set_read_timeout(Some(timeout));
    // Unconnected send: exercises the sendmsg hooks.
    if let Err(e) = socket.send_to(b"ping", addr) {
        return classify(&e);
    }
    let mut buf = [0u8; 16];
    match socket.recv_from(&mut buf) {
        Ok((4, from)) if &buf[..4] == b"pong" && from.ip() == addr.ip() => Outcome::Ok,
        Ok(_) => Outcome::Error("unexpected reply".into()),
        Err(e) => classify(&e),
    }
}

fn probe(args: &[String]) {
    let [proto, ip, port, rest @ ..] = args else {
        usage()
    };
    let ip: IpAddr = ip.parse().unwrap_or_else(|_| usage());
    let port: u16 = port.parse().unwrap_or_else(|_| usage());
    let timeout = match rest {
        [] => Duration::from_millis(1000),
        [flag, ms] if flag == "--timeout-ms" => {
            Duration::from_millis(ms.parse().unwrap_or_else(|_| usage()))
        }
        _ => usage(),
    };
    let addr = SocketAddr::new(ip, port);
    let outcome = match proto.as_str() {
        "tcp" => probe_tcp(addr, timeout),
        "udp" => probe_udp(addr, timeout),
        _ => usage(),
    };
    let (word, code) = match outcome {
        Outcome::Ok => ("ok".to_owned(), 0),
        Outcome::Eperm => ("eperm".to_owned(), 2),
        Outcome::Refused => ("refused".to_owned(), 3),
        Outcome::Timeout => ("timeout".to_owned(), 4),
        Outcome::Error(e) => (format!("error {e}"), 5),
    };
    println!("{word}");
    std::process::exit(code);
}

/// Many connects in a row (each refused at once when egress denies them).
fn flood(args: &[String]) {
    let [ip, port, count] = args else { usage() };
    let ip: IpAddr = ip.parse().unwrap_or_else(|_| usage());
    let port: u16 = port.parse().unwrap_or_else(|_| usage());
    let count: u32 = count.parse().unwrap_or_else(|_| usage());
    let addr = SocketAddr::new(ip, port);
    let mut eperm = 0u32;
    for _ in 0..count {
        if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            && matches!(classify(&e), Outcome::Eperm)
        {
            eperm += 1;
        }
    }
    println!("{eperm}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("flood") => flood(&args[1..]),
        Some("probe") => probe(&args[1..]),
        _ => usage(),
    }
}
