use super::*;
use proptest::prelude::*;

fn check_invariants(m: &BlockManager, live: &[(SeqBlocks, Vec<u32>)]) {
    let n = m.num_blocks();
    let mut expect = vec![0u32; n];
    for (s, _) in live {
        for b in &s.table {
            expect[b.0 as usize] += 1;
        }
    }
    assert_eq!(m.refs, expect, "refcounts must equal table references");
    let u = m.usage();
    assert_eq!(u.used + u.cached + u.free, n);
    assert_eq!(u.used, expect.iter().filter(|&&r| r > 0).count());
    let mut seen = vec![false; n];
    for b in &m.free {
        assert!(!seen[b.0 as usize], "block {} twice in the free list", b.0);
        seen[b.0 as usize] = true;
        assert_eq!(m.refs[b.0 as usize], 0);
        assert!(m.hash_of[b.0 as usize].is_none());
    }
    let mut i = m.lru_head;
    let mut count = 0;
    while i != NIL {
        assert!(!seen[i as usize], "block {i} both free and cached");
        seen[i as usize] = true;
        assert_eq!(m.refs[i as usize], 0);
        assert!(m.hash_of[i as usize].is_some());
        i = m.next[i as usize];
        count += 1;
    }
    assert_eq!(count, m.evictable);
    for (h, b) in &m.by_hash {
        assert_eq!(m.hash_of[b.0 as usize], Some(*h));
    }
}

#[test]
fn shared_prefix_reuses_blocks_and_leaves_the_last_token() {
    let mut m = BlockManager::new(8, 4);
    let prompt: Vec<u32> = (0..10).collect();
    let (mut a, cached) = m.allocate_prompt(&prompt).unwrap();
    assert_eq!((a.table.len(), cached), (3, 0));
    m.commit(&mut a, &prompt, 10);
    assert_eq!(a.hashes.len(), 2);
    // Same first 8 tokens: two blocks shared.
    let other: Vec<u32> = (0..8).chain([99, 98, 97]).collect();
    let (b, cached) = m.allocate_prompt(&other).unwrap();
    assert_eq!(cached, 8);
    assert_eq!(b.table[..2], a.table[..2]);
    assert_eq!(m.ref_count(a.table[0]), 2);
    // A prompt that is exactly the cached blocks recomputes its last block.
    let exact: Vec<u32> = (0..8).collect();
    let (c, cached) = m.allocate_prompt(&exact).unwrap();
    assert_eq!(cached, 4);
    assert_eq!(c.table.len(), 2);
    m.free(a);
    m.free(b);
    m.free(c);
    let u = m.usage();
    assert_eq!(u.used, 0);
    assert_eq!(u.cached, 2);
    assert_eq!(m.cache_hit_tokens, 12);
}

#[test]
fn eviction_is_lru_and_out_of_blocks_holds_nothing() {
    let mut m = BlockManager::new(4, 2);
    let p1 = [1, 2, 3, 4];
    let (mut s1, _) = m.allocate_prompt(&p1).unwrap();
    m.commit(&mut s1, &p1, 4);
    let h1 = s1.hashes[0];
    m.free(s1);
    assert_eq!(m.usage().cached, 2);
    // Five blocks do not fit in four: nothing is taken and the cache survives.
    let before = m.usage();
    assert!(matches!(m.allocate_prompt(&[7; 10]), Err(EngineError::OutOfBlocks { .. })));
    assert_eq!(m.usage(), before);
    // Four fresh blocks evict both cached ones; the prefix's tail goes first.
    let (s2, _) = m.allocate_prompt(&[9, 9, 9, 9, 9, 9]).unwrap();
    assert_eq!(m.usage().cached, 1);
    assert!(m.by_hash.contains_key(&h1), "the head of the prefix outlives its tail");
    m.free(s2);
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(Vec<u32>),
    Grow(usize, usize),
    Commit(usize),
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // A tiny alphabet so that prompts share prefixes often.
        proptest::collection::vec(0u32..3, 1..20).prop_map(Op::Alloc),
        (any::<usize>(), 1usize..6).prop_map(|(i, n)| Op::Grow(i, n)),
        any::<usize>().prop_map(Op::Commit),
        any::<usize>().prop_map(Op::Free),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_operation_sequences_keep_exact_refcounts(ops in proptest::collection::vec(op(), 1..80)) {
        let mut m = BlockManager::new(12, 4);
        // Each live sequence: its blocks and its tokens (prompt plus grown positions).
        let mut live: Vec<(SeqBlocks, Vec<u32>)> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(tokens) => {
                    let before = m.usage();
                    match m.allocate_prompt(&tokens) {
                        Ok((s, cached)) => {
                            prop_assert!(cached < tokens.len());
                            prop_assert_eq!(cached % 4, 0);
                            live.push((s, tokens));
                        }
                        Err(_) => prop_assert_eq!(m.usage(), before),
                    }
                }
                Op::Grow(i, n) if !live.is_empty() => {
                    let k = i % live.len();
                    let (s, t) = &mut live[k];
                    let len = t.len() + n;
                    if m.grow(s, len).is_ok() {
                        t.extend(std::iter::repeat_n(1, n));
                    }
                }
                Op::Commit(i) if !live.is_empty() => {
                    let k = i % live.len();
                    let (s, t) = &mut live[k];
                    m.commit(s, t, t.len());
                }
                Op::Free(i) if !live.is_empty() => {
                    let k = i % live.len();
                    let (s, _) = live.swap_remove(k);
                    m.free(s);
                }
                _ => {}
            }
            check_invariants(&m, &live);
        }
        for (s, _) in live.drain(..) {
            m.free(s);
        }
        check_invariants(&m, &[]);
        prop_assert_eq!(m.usage().used, 0);
    }
}
