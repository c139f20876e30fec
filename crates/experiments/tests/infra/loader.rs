use flowmap_experiments::data::loader::{DataPosition, Order};

#[test]
fn resumed_order_is_identical_across_an_epoch_boundary() {
    let mut straight = Order::new(10, 3, 7, DataPosition::default()).unwrap();
    let all: Vec<Vec<i64>> = (0..8).map(|_| straight.next_batch()).collect();
    // 3 batches per epoch (the last item of each epoch is dropped); resume after 2 batches.
    let mut first = Order::new(10, 3, 7, DataPosition::default()).unwrap();
    let _ = (first.next_batch(), first.next_batch());
    let pos = first.position();
    let mut resumed = Order::new(10, 3, 7, pos).unwrap();
    let rest: Vec<Vec<i64>> = (0..6).map(|_| resumed.next_batch()).collect();
    assert_eq!(rest, all[2..].to_vec());
    // Every epoch visits 9 distinct items; consecutive epochs are permuted differently.
    let e0: std::collections::BTreeSet<i64> = all[..3].concat().into_iter().collect();
    assert_eq!(e0.len(), 9);
    assert_ne!(all[..3].concat(), all[3..6].concat());
    assert_eq!(resumed.position(), DataPosition { epoch: 2, cursor: 2 });
}

#[test]
fn different_seeds_give_different_orders_and_bad_sizes_are_errors() {
    let a = Order::new(100, 10, 1, DataPosition::default()).unwrap().next_batch();
    let b = Order::new(100, 10, 2, DataPosition::default()).unwrap().next_batch();
    assert_ne!(a, b);
    assert!(Order::new(5, 6, 0, DataPosition::default()).unwrap_err().to_string().contains("batch_size 6"));
}
