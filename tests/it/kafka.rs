//! The real broker on loopback: a produce/consume round trip on a per-test topic.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::helpers::{create_topic, kafka_brokers};

#[tokio::test]
async fn a_message_produced_to_the_broker_is_consumed_with_key_payload_and_headers() {
    let topic = create_topic(3).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let payload = format!("payload for {topic}");

    let delivery = producer
        .send(
            FutureRecord::to(&topic)
                .key("tenant-a")
                .payload(&payload)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "content-type",
                    value: Some("application/json"),
                })),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", format!("{topic}-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a message within 30 s")
        .expect("consume");

    assert_eq!(message.partition(), delivery.partition);
    assert_eq!(message.offset(), delivery.offset);
    assert_eq!(message.key(), Some("tenant-a".as_bytes()));
    assert_eq!(message.payload(), Some(payload.as_bytes()));
    let header = message.headers().expect("headers").get(0);
    assert_eq!(header.key, "content-type");
    assert_eq!(header.value, Some("application/json".as_bytes()));
}
