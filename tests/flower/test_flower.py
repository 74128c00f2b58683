"""Flower adapters: the Flower engine gives the in-process engine's bits; faults; deployment config."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity
from torch.utils.data import TensorDataset

from fedsparse_lib.federated.messages import WireOptions, encode_broadcast
from fedsparse_lib.federated.simulation import DatasetClient, FederationError, run_federated
from fedsparse_lib.federated.strategies import METHODS, ClientUpdate, make_strategy
from fedsparse_lib.flower import FlowerClient, FlowerServer, InlineGrid, by_partition, run_flower
from fedsparse_lib.flower.protocol import Record, payload_bytes, payload_record
from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.training import TrainConfig

SHAPE = (12, 14, 12)
TRAIN = TrainConfig(lr=1e-3, optimizer="adam")
ROUND_COLUMNS = ["server_round", "phase", "mae", "rmse", "r", "mean_gap", "sparsity", "target_sparsity", "vote_sparsity",
                 "num_clients", "num_excluded", "bytes_down", "bytes_up", "paper_bytes_down", "paper_bytes_up"]
CLIENT_COLUMNS = ["server_round", "client_id", "num_examples", "status", "bytes_down", "bytes_up", "paper_bytes_down",
                  "paper_bytes_up", "train_loss"]


def tiny_model() -> BrainAgeCNN:
    return BrainAgeCNN(SHAPE, width=0.125, mean_age=65.0, output_scale=10.0)


@pytest.fixture(scope="module")
def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ages = torch.rand(48, generator=g) * 30 + 50
    x = torch.randn(48, 1, *SHAPE, generator=g) + (ages.view(-1, 1, 1, 1, 1) - 65) / 10
    return TensorDataset(x, ages)


@pytest.fixture(scope="module")
def test_set(data: TensorDataset) -> TensorDataset:
    return TensorDataset(data.tensors[0][:12], data.tensors[1][:12])


def make_clients(data: TensorDataset, ids: tuple[int, ...] = (0, 1, 2, 3)) -> list[DatasetClient]:
    return [DatasetClient(c, data, np.arange(12 + 9 * k, 21 + 9 * k), batch_size=4) for k, c in enumerate(ids)]


def assert_same_run(a, b) -> None:  # noqa: ANN001 - a FederatedResult and a FlowerResult
    assert list(a.state.weights) == list(b.state.weights)
    for k, v in a.state.weights.items():
        assert torch.equal(v, b.state.weights[k]), k
    assert list(a.state.mask) == list(b.state.mask)
    for k, m in a.state.mask.items():
        assert torch.equal(m, b.state.mask[k]), k
    pd.testing.assert_frame_equal(a.rounds[ROUND_COLUMNS], b.rounds[ROUND_COLUMNS])
    pd.testing.assert_frame_equal(a.clients[CLIENT_COLUMNS].reset_index(drop=True),
                                  b.clients[CLIENT_COLUMNS].reset_index(drop=True))


# --- parity with the in-process engine ------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_flower_gives_the_in_process_bits(method: str, data: TensorDataset, test_set: TensorDataset) -> None:
    # Prepare
    clients = make_clients(data)
    options = dict(local_epochs=1, train_config=TRAIN, seed=3, progress=False)

    # Execute
    a = run_federated(make_strategy(method, num_rounds=3, final_sparsity=0.8), tiny_model, clients, test_set,
                      **options)
    b = run_flower(make_strategy(method, num_rounds=3, final_sparsity=0.8), tiny_model, clients, test_set,
                   **options)

    # Assert: same weights, masks, metrics and bytes; the run did train and (for pruning methods) prune
    assert_same_run(a, b)
    assert not torch.equal(b.state.weights["net.conv1.weight"], initial_conv1(seed=3))
    if method not in ("fedavg", "fedprox"):
        assert b.rounds["sparsity"].iloc[-1] == pytest.approx(0.8, abs=0.01)
    assert b.faults.empty
    assert b.rounds["bytes_down"].iloc[1:].gt(0).all()


def initial_conv1(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return tiny_model().state_dict()["net.conv1.weight"]


def fault(server_round: int, client_id: int, update: ClientUpdate) -> ClientUpdate:
    """Client 5 crashes in round 2; client 7 uploads NaN weights in round 3."""
    if server_round == 2 and client_id == 5:
        raise RuntimeError("boom")
    if server_round == 3 and client_id == 7:
        update.weights["net.conv1.weight"][0] = float("nan")
    return update


@pytest.mark.parametrize("method", ["fedsparsify_local", "prunefl"])
def test_parity_with_partial_participation_float16_tuning_and_faults(method: str, data: TensorDataset,
                                                                     test_set: TensorDataset) -> None:
    # Prepare: client ids out of order, lossy wire, 3 of 4 clients per round, a tuning round, faults
    clients = make_clients(data, ids=(10, 5, 7, 2))
    options = dict(local_epochs=2, tune_rounds=1, participation=0.75, seed=5, train_config=TRAIN, progress=False,
                   wire=WireOptions(values="float16", compress_payload=True), fault_fn=fault, score_client=7)

    # Execute
    a = run_federated(make_strategy(method, num_rounds=3, final_sparsity=0.8), tiny_model, clients, test_set,
                      **options)
    b = run_flower(make_strategy(method, num_rounds=3, final_sparsity=0.8), tiny_model, clients, test_set,
                   **options)

    # Assert: identical, and the same clients were excluded for the same reasons
    assert_same_run(a, b)
    assert a.faults[["server_round", "client_id"]].equals(b.faults[["server_round", "client_id"]])
    assert len(b.faults) == (b.clients["status"] == "excluded").sum() >= 1
    for reason_a, reason_b in zip(a.faults["reason"], b.faults["reason"], strict=True):
        assert reason_a in reason_b  # Flower adds the error code


def test_nodes_map_partition_ids_to_client_ids(data: TensorDataset) -> None:
    result = run_flower(make_strategy("fedavg", num_rounds=1), tiny_model, make_clients(data, ids=(10, 5, 7)),
                        progress=False)

    assert result.nodes["partition_id"].tolist() == [0, 1, 2]
    assert result.nodes["client_id"].tolist() == [10, 5, 7]
    assert result.nodes["node_id"].is_unique
    assert result.clients["client_id"].tolist() == [10, 5, 7]
    assert "mae" not in result.rounds  # no test set: no evaluation


def test_broadcast_crosses_flower_as_our_codec_bytes(data: TensorDataset) -> None:
    # Prepare: a ClientApp that records what it receives
    strategy = make_strategy("fedsparsify_global", num_rounds=2, final_sparsity=0.5)
    clients = make_clients(data)[:2]
    client = FlowerClient(strategy, tiny_model, by_partition(clients))
    received: list[bytes] = []
    app = ClientApp()

    @app.query("hello")
    def _hello(message: Message, context: Context) -> Message:
        return client.hello(message, context)

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        received.append(payload_bytes(message))
        return client.train(message, context)

    server = FlowerServer(strategy, tiny_model, num_clients=2, progress=False)
    grid = InlineGrid(app, [{"partition-id": 0}, {"partition-id": 1}])

    # Execute
    grid.run_server_app(server.app())
    result = server.result()

    # Assert: the bytes the nodes received are the codec's broadcast, and the counts are their lengths
    torch.manual_seed(0)
    initial = strategy.initialize(tiny_model())
    expected, _ = encode_broadcast(initial, WireOptions())
    assert received[0] == received[1] == expected
    assert result.clients["bytes_down"].tolist()[:2] == [len(expected)] * 2
    traffic = pd.DataFrame(grid.traffic)
    down = traffic[(traffic["message_type"] == "train") & (traffic["direction"] == "down")]
    overhead = down["bytes"].to_numpy() - result.clients["bytes_down"].to_numpy()
    assert (overhead > 0).all() and (overhead < 2000).all()  # Flower's envelope, not counted as communication


def test_payload_record_survives_flower_serialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = bytes(range(256)) * 3
    for attribute in ("_run_id", "_node_id", "_task_id"):  # Flower stamps new messages with the task identity
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    message = Message(RecordDict({Record.PAYLOAD.value: payload_record(blob)}), 7, "train", group_id="1")
    back = message_from_proto(ProtoMessage.FromString(message_to_proto(message).SerializeToString()))

    assert payload_bytes(back) == blob
    with pytest.raises(ValueError, match="no 'payload'"):
        payload_bytes(Message(RecordDict(), 7, "train"))


# --- faults -------------------------------------------------------------------------------------

def corrupting_app(client: FlowerClient, bad_client: int) -> ClientApp:
    """A ClientApp whose node ``bad_client`` flips one byte of its uploads (a broken network or client)."""
    app = ClientApp()

    @app.query("hello")
    def _hello(message: Message, context: Context) -> Message:
        return client.hello(message, context)

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        reply = client.train(message, context)
        if client.data(context).client_id == bad_client:
            array = reply.content.array_records[Record.PAYLOAD.value]["message"]
            data = bytearray(array.data)
            data[-1] ^= 0xFF
            array.data = bytes(data)
        return reply

    return app


def test_server_excludes_an_update_that_does_not_decode(data: TensorDataset) -> None:
    strategy = make_strategy("fedavg", num_rounds=2)
    clients = make_clients(data)[:3]
    server = FlowerServer(strategy, tiny_model, num_clients=3, progress=False)
    grid = InlineGrid(corrupting_app(FlowerClient(strategy, tiny_model, by_partition(clients)), bad_client=1),
                      [{"partition-id": k} for k in range(3)])

    grid.run_server_app(server.app())
    result = server.result()

    assert result.faults["client_id"].tolist() == [1, 1]
    assert result.faults["reason"].str.contains("CodecError").all()
    assert result.rounds["num_clients"].tolist() == [0, 2, 2]


def test_too_few_clients_raise_federation_error(data: TensorDataset) -> None:
    def crash(server_round: int, client_id: int, update: ClientUpdate) -> ClientUpdate:
        if client_id != 0:
            raise RuntimeError(f"client {client_id} is down")
        return update

    with pytest.raises(FederationError, match=r"round 1: only 1 usable client update.*client 2 is down"):
        run_flower(make_strategy("fedavg", num_rounds=2), tiny_model, make_clients(data)[:3], min_clients=2,
                   fault_fn=crash, progress=False)


def test_a_late_client_is_excluded(data: TensorDataset) -> None:
    def slow(server_round: int, client_id: int, update: ClientUpdate) -> ClientUpdate:
        if client_id == 1 and server_round == 1:
            time.sleep(1.5)
        return update

    result = run_flower(make_strategy("fedavg", num_rounds=2), tiny_model, make_clients(data)[:2],
                        client_timeout=1.0, fault_fn=slow, progress=False)

    assert result.faults[["server_round", "client_id"]].values.tolist() == [[1, 1]]
    assert "no reply within client_timeout" in result.faults["reason"].iloc[0]


def test_a_node_without_partition_id_is_named(data: TensorDataset) -> None:
    strategy = make_strategy("fedavg", num_rounds=1)
    client = FlowerClient(strategy, tiny_model, by_partition(make_clients(data)[:2]))
    grid = InlineGrid(client.app(), [{"partition-id": 0}, {}])

    with pytest.raises(FederationError, match="partition-id"):
        grid.run_server_app(FlowerServer(strategy, tiny_model, num_clients=2, progress=False).app())


# --- deployment ---------------------------------------------------------------------------------

def test_run_config_section_is_valid_for_flwr() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from flwr.common.config import validate_config

    from fedsparse_lib.flower.deploy import RUN_CONFIG, run_config_toml

    section = tomllib.loads(run_config_toml())["tool"]["flwr"]["app"]["config"]
    assert section == {k: v for k, (v, _) in RUN_CONFIG.items()}
    pyproject = {"project": {"name": "fedsparse", "version": "0.1.0", "description": "", "license": "MIT"},
                 "tool": {"flwr": {"app": {"publisher": "fedsparse", "config": section,
                                           "components": {"serverapp": "fedsparse_lib.flower.deploy:server_app",
                                                          "clientapp": "fedsparse_lib.flower.deploy:client_app"}}}}}
    ok, errors, _ = validate_config(pyproject, check_module=True, project_dir=Path(__file__).parents[2])
    assert ok, errors


def test_deploy_apps_run_from_run_and_node_configs(make_bids_dataset: Callable[..., Path], tmp_path: Path) -> None:
    # Prepare: two sites of four tiny scans each, the deployment apps, and Flower's configs
    from fedsparse_lib.flower import deploy

    sites = [make_bids_dataset(ages=(55, 62, 70, 78), name=f"site{k}", seed=k) for k in range(2)]
    run_config = {"method": "fedsparsify_global", "num-rounds": 2, "final-sparsity": 0.5, "num-clients": 2,
                  "local-epochs": 1, "batch-size": 2, "lr": 1e-3, "optimizer": "adam", "resolution-mm": 6,
                  "width": 0.125, "mean-age": 65.0, "output-scale": 10.0, "test-dir": str(sites[0]),
                  "output-dir": str(tmp_path / "out"), "connect-timeout": 5.0}
    nodes = [{"partition-id": k, "data-dir": str(site)} for k, site in enumerate(sites)]
    grid = InlineGrid(deploy.client_app, nodes, run_config=run_config)

    # Execute
    grid.run_server_app(deploy.server_app)

    # Assert
    rounds = pd.read_csv(tmp_path / "out" / "rounds.csv")
    assert rounds["server_round"].tolist() == [0, 1, 2]
    assert rounds["sparsity"].iloc[-1] == pytest.approx(0.5, abs=0.01)
    assert rounds["mae"].notna().all()
    assert pd.read_csv(tmp_path / "out" / "nodes.csv")["client_id"].tolist() == [0, 1]
    assert (tmp_path / "out" / "checkpoints" / "round-0002.safetensors").is_file()


def test_deploy_client_without_data_dir_is_named() -> None:
    from fedsparse_lib.flower import deploy

    context = Context(run_id=1, node_id=99, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="data-dir"):
        deploy.client_from_context(context)
