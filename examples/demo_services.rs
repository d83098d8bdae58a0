//! The API-gateway demo's upstream services on their own: two `users` and two `products`
//! instances on loopback, registered in the in-process registry. Sends a few requests,
//! flips one instance to failing and back, prints what it saw, and ends by itself.
//!
//! ```sh
//! cargo run --example demo_services --features http,consul
//! ```

#[path = "support/demo_services.rs"]
mod demo_services;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use seawall::BoxError;

use demo_services::{DemoFleet, Fault, FleetSpec, INSTANCE_HEADER};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// GET `url`: status, `x-instance` and body, within 2 s.
async fn get(client: &HttpClient, url: &str) -> Result<(u16, String, String), BoxError> {
    let response = tokio::time::timeout(Duration::from_secs(2), client.get(url.parse()?)).await??;
    let status = response.status().as_u16();
    let instance = response
        .headers()
        .get(INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        instance,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

async fn show(client: &HttpClient, url: &str) -> Result<(), BoxError> {
    let (status, instance, body) = get(client, url).await?;
    let body = if body.chars().count() > 100 {
        format!("{}...", body.chars().take(100).collect::<String>())
    } else {
        body
    };
    println!("  GET {url} -> {status} from {instance}: {body}");
    Ok(())
}

fn passing(fleet: &DemoFleet, service: &str) -> Vec<String> {
    let mut watch = fleet.registry().watch(service);
    watch
        .current()
        .iter()
        .map(|i| i.id.service_id().to_owned())
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let check_delay = Duration::from_millis(500);
    let fleet = DemoFleet::start(FleetSpec::new(2, 2).check_delay(check_delay)).await?;
    println!("started:");
    for instance in fleet.instances() {
        println!(
            "  {:<10} {:<8} {}",
            instance.id(),
            instance.service(),
            instance.base_url()
        );
    }

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let users1 = fleet.instance("users-1").ok_or("users-1 missing")?;
    let users2 = fleet.instance("users-2").ok_or("users-2 missing")?;
    let products1 = fleet.instance("products-1").ok_or("products-1 missing")?;

    println!("\nrequests:");
    show(&client, &format!("{}/users", users1.base_url())).await?;
    show(&client, &format!("{}/users/2", users2.base_url())).await?;
    show(&client, &format!("{}/users/42", users1.base_url())).await?;
    show(&client, &format!("{}/products/3", products1.base_url())).await?;
    println!("  registry passing users: {:?}", passing(&fleet, "users"));

    println!("\nusers-1 fails (through POST /fault?mode=failing):");
    let answer = client
        .request(
            http::Request::post(format!("{}/fault?mode=failing", users1.base_url()))
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    println!("  POST /fault -> {}", answer.status());
    show(&client, &format!("{}/users/1", users1.base_url())).await?;
    show(&client, &format!("{}/health", users1.base_url())).await?;
    println!(
        "  registry passing users at once: {:?}",
        passing(&fleet, "users")
    );
    tokio::time::sleep(check_delay + Duration::from_millis(200)).await;
    println!(
        "  after the check delay ({check_delay:?}): {:?}",
        passing(&fleet, "users")
    );

    println!("\nusers-1 recovers (through its FaultHandle):");
    users1.fault().set(Fault::Healthy);
    show(&client, &format!("{}/users/1", users1.base_url())).await?;
    tokio::time::sleep(check_delay + Duration::from_millis(200)).await;
    println!(
        "  after the check delay: registry passing users: {:?}",
        passing(&fleet, "users")
    );

    println!("\nrequests per instance:");
    for instance in fleet.instances() {
        println!("  {:<10} {}", instance.id(), instance.requests());
    }
    fleet.shutdown().await?;
    println!("\nshut down: deregistered, then stopped");
    Ok(())
}
