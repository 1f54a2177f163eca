def test_world_has_two_tenants(world):
    assert world.alice.tier == world.bob.tier
