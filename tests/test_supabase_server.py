"""The Supabase stand-in (tests/supabase_server.py) speaks what the real clients expect: postgrest's
SyncPostgrestClient and storage3's SyncStorageClient (2.34.1) against it, and raw httpx for TUS uploads."""

import base64
import hashlib
import os
import uuid

import httpx
import pytest
from postgrest import SyncPostgrestClient
from postgrest.exceptions import APIError
from storage3 import SyncStorageClient
from storage3.exceptions import StorageApiError

import supabase_fixtures
from supabase_server import TUS_CHUNK, multipart_etag

postgres_dsn, supabase = supabase_fixtures.postgres_dsn, supabase_fixtures.supabase  # the fixtures used here

JOBS, METRICS = "pipeline_training_jobs", "pipeline_training_metrics"
ACTIVE = ["pending", "queued", "initializing", "running"]
EXP = '"exp" claim timestamp check failed'


def rest_client(server, key=None) -> SyncPostgrestClient:
    key = key or server.service_key
    return SyncPostgrestClient(f"{server.url}/rest/v1", headers={"apikey": key, "Authorization": f"Bearer {key}"})


def storage_client(server, key=None) -> SyncStorageClient:
    key = key or server.service_key
    return SyncStorageClient(f"{server.url}/storage/v1/", {"apikey": key, "Authorization": f"Bearer {key}"})


def new_job(server, **fields) -> dict:
    return rest_client(server).table(JOBS).insert({"job_name": "eq12-lora", **fields}).execute().data[0]


# -- REST ----------------------------------------------------------------------------------------------------------
def test_insert_and_read_back_a_job_row(supabase):
    client = rest_client(supabase)
    row = client.table(JOBS).insert({"job_name": "eq12-lora", "status": "queued", "engine_features": ["arc"],
                                     "estimated_cost": 1.5}).execute().data[0]
    uuid.UUID(row["id"])  # the migration's default, uuid_generate_v4(), as a string
    assert row["status"] == "queued" and row["epochs"] == 3 and row["engine_features"] == ["arc"]
    assert row["estimated_cost"] == 1.50 and row["created_at"].endswith("+00:00")  # ISO 8601, UTC

    got = client.table(JOBS).select("*").eq("id", row["id"]).execute().data
    assert got == [row]
    assert client.table(JOBS).select("id,status").eq("id", row["id"]).single().execute().data == {
        "id": row["id"], "status": "queued"}
    assert supabase.sql(f"SELECT job_name FROM {JOBS} WHERE id = %s", (row["id"],)) == [{"job_name": "eq12-lora"}]
    assert ("POST", f"/rest/v1/{JOBS}", "", 201) in supabase.requests
    with pytest.raises(APIError) as err:  # job_name is NOT NULL: PostgreSQL says so
        client.table(JOBS).insert({"status": "queued"}).execute()
    assert err.value.code == "23502" and "job_name" in err.value.message


def test_update_guarded_by_status_returns_nothing_once_cancelled(supabase):
    client, job = rest_client(supabase), new_job(supabase)

    def guarded_update(fields):
        return client.table(JOBS).update(fields).eq("id", job["id"]).in_("status", ACTIVE).execute().data

    first = guarded_update({"status": "running", "progress": 5, "current_loss": 1.25})
    assert [(r["id"], r["status"], r["progress"], r["current_loss"]) for r in first] == [
        (job["id"], "running", 5, 1.25)]
    supabase.sql(f"UPDATE {JOBS} SET status = 'cancelled' WHERE id = %s", (job["id"],))
    assert guarded_update({"progress": 50}) == []  # matched no row: 200 [], not an error
    assert supabase.sql(f"SELECT status, progress FROM {JOBS}") == [{"status": "cancelled", "progress": 5}]
    assert [r[3] for r in supabase.requests if r[0] == "PATCH"] == [200, 200]


def test_values_are_judged_by_postgres(supabase):
    client, job = rest_client(supabase), new_job(supabase)
    with pytest.raises(APIError) as err:
        client.table(JOBS).update({"progress": 12.5}).eq("id", job["id"]).execute()
    assert err.value.code == "22P02" and err.value.message == 'invalid input syntax for type integer: "12.5"'
    assert supabase.requests[-1][3] == 400
    assert client.table(JOBS).update({"progress": 12}).eq("id", job["id"]).execute().data[0]["progress"] == 12

    with pytest.raises(APIError) as err:
        client.table(JOBS).update({"gpu_utilisation": 0.5}).eq("id", job["id"]).execute()
    assert err.value.code == "PGRST204"
    assert err.value.message == f"Could not find the 'gpu_utilisation' column of '{JOBS}' in the schema cache"
    with pytest.raises(APIError) as err:
        client.table(JOBS).select("*").eq("id", "not-a-uuid").execute()
    assert err.value.code == "22P02"


def test_bulk_insert_of_metrics(supabase):
    client, job = rest_client(supabase), new_job(supabase)
    rows = [{"job_id": job["id"], "metric_id": "train_loss", "metric_name": "Training loss",
             "metric_level": "universal", "value": 2.0 - step / 10, "step_number": step} for step in (10, 20, 30)]
    rows[1]["unit"] = "nats"  # the client sends columns= (all rows' keys): the others' unit is NULL
    stored = client.table(METRICS).insert(rows).execute().data
    assert [(r["step_number"], r["value"], r["unit"]) for r in stored] == [(10, 1.0, None), (20, 0.0, "nats"),
                                                                          (30, -1.0, None)]
    latest = client.table(METRICS).select("step_number").eq("job_id", job["id"]).order(
        "step_number", desc=True).limit(2).execute().data
    assert latest == [{"step_number": 30}, {"step_number": 20}]

    bad = rows[:1] + [{**rows[0], "job_id": str(uuid.uuid4())}]  # the second row's job does not exist
    with pytest.raises(APIError) as err:
        client.table(METRICS).insert(bad).execute()
    assert err.value.code == "23503" and supabase.requests[-1][3] == 409
    assert len(supabase.sql(f"SELECT id FROM {METRICS}")) == 3  # one transaction: neither row was stored


def test_unknown_table_and_wrong_key(supabase):
    with pytest.raises(APIError) as err:
        rest_client(supabase).table("training_jobs").select("*").execute()
    assert err.value.code == "PGRST205"
    assert err.value.message == "Could not find the table 'public.training_jobs' in the schema cache"
    assert supabase.requests[-1][3] == 404

    with pytest.raises(APIError) as err:
        rest_client(supabase, key="eyJ.wrong.key").table(JOBS).select("*").execute()
    assert err.value.message == "Invalid API key" and supabase.requests[-1][3] == 401
    answer = httpx.get(f"{supabase.url}/rest/v1/{JOBS}", headers={"apikey": supabase.service_key})
    assert answer.status_code == 401 and answer.json()["message"] == "Invalid API key"  # no bearer token


def test_rest_down_and_up(supabase):
    client, job = rest_client(supabase), new_job(supabase)
    supabase.put_object("training-files", "d.jsonl", b"{}\n")
    storage = storage_client(supabase).from_("training-files")

    supabase.rest_down(mode="503")
    answer = httpx.patch(f"{supabase.url}/rest/v1/{JOBS}?id=eq.{job['id']}", json={"progress": 1},
                         headers={"apikey": supabase.service_key, "Authorization": f"Bearer {supabase.service_key}"})
    assert answer.status_code == 503 and answer.json() == {"message": "upstream unavailable"}
    with pytest.raises(APIError) as err:
        client.table(JOBS).update({"progress": 2}).eq("id", job["id"]).execute()
    assert err.value.message == "upstream unavailable"
    assert storage.download("d.jsonl") == b"{}\n"  # Storage is unaffected

    supabase.rest_down(mode="reset")
    with pytest.raises(httpx.RemoteProtocolError):
        client.table(JOBS).update({"progress": 3}).eq("id", job["id"]).execute()
    assert supabase.requests[-1][:2] == ("PATCH", f"/rest/v1/{JOBS}") and supabase.requests[-1][3] is None

    supabase.rest_up()
    assert client.table(JOBS).update({"progress": 4}).eq("id", job["id"]).execute().data[0]["progress"] == 4
    assert supabase.sql(f"SELECT progress FROM {JOBS}") == [{"progress": 4}]


def test_fail_next(supabase):
    job = new_job(supabase)
    supabase.fail_next[("PATCH", f"/rest/v1/{JOBS}")] = [429, 503, "reset"]
    headers = {"apikey": supabase.service_key, "Authorization": f"Bearer {supabase.service_key}",
               "Prefer": "return=representation"}
    with httpx.Client(headers=headers) as http:
        url = f"{supabase.url}/rest/v1/{JOBS}?id=eq.{job['id']}"
        first = http.patch(url, json={"progress": 7})
        assert first.status_code == 429 and first.headers["Retry-After"] == "1"
        assert http.patch(url, json={"progress": 7}).status_code == 503
        with pytest.raises(httpx.RemoteProtocolError):
            http.patch(url, json={"progress": 7})
        answer = http.patch(url, json={"progress": 7})
        assert answer.status_code == 200 and answer.json()[0]["progress"] == 7
    assert [r[3] for r in supabase.requests[-4:]] == [429, 503, None, 200]


# -- Storage -------------------------------------------------------------------------------------------------------
def test_upload_info_upsert_and_duplicate(supabase):
    bucket = storage_client(supabase).from_("lora-models")
    data = os.urandom(200_000) + b"\r\n--boundary\r\n\r\n" + b"\r" * 7  # binary, with what multipart parsers trip on
    opts = {"upsert": "true", "content-type": "application/gzip"}
    assert bucket.upload("adapters/x.tar.gz", data, opts).path == "adapters/x.tar.gz"
    assert supabase.objects[("lora-models", "adapters/x.tar.gz")] == data
    info = bucket.info("adapters/x.tar.gz")
    md5 = hashlib.md5(data).hexdigest()
    assert (info["size"], info["etag"], info["content_type"], info["name"]) == (
        len(data), f'"{md5}"', "application/gzip", "adapters/x.tar.gz")
    assert info["metadata"]["size"] == len(data) and info["metadata"]["eTag"] == f'"{md5}"'
    assert bucket.exists("adapters/x.tar.gz") and not bucket.exists("adapters/y.tar.gz")

    bucket.upload("adapters/x.tar.gz", b"second", opts)  # upsert replaces
    assert bucket.info("adapters/x.tar.gz")["size"] == 6 and bucket.download("adapters/x.tar.gz") == b"second"
    with pytest.raises(StorageApiError) as err:
        bucket.upload("adapters/x.tar.gz", b"third", {"content-type": "application/gzip"})
    assert (err.value.status, err.value.code) == ("409", "Duplicate")
    assert supabase.requests[-1][3] == 400  # Supabase answers HTTP 400 with statusCode "409"

    supabase.file_size_limit = 1000
    with pytest.raises(StorageApiError) as err:
        bucket.upload("adapters/big.tar.gz", b"x" * 1001, opts)
    assert (err.value.status, err.value.code) == ("413", "Payload too large")
    bucket.upload("adapters/big.tar.gz", b"x" * 1000, opts)
    assert bucket.remove(["adapters/big.tar.gz", "adapters/none"])[0]["name"] == "adapters/big.tar.gz"
    assert ("lora-models", "adapters/big.tar.gz") not in supabase.objects


def test_signed_url_and_expiry(supabase):
    bucket = storage_client(supabase).from_("lora-models")
    bucket.upload("adapters/job-1.tar.gz", b"adapter bytes", {"content-type": "application/gzip"})
    url = bucket.create_signed_url("adapters/job-1.tar.gz", 3600)["signedURL"]
    assert url.startswith(f"{supabase.url}/storage/v1/object/sign/lora-models/adapters/job-1.tar.gz?token=")
    answer = httpx.get(url)  # no key: the token is the credential
    assert answer.status_code == 200 and answer.content == b"adapter bytes"
    assert answer.headers["Content-Length"] == "13"

    other = url.replace("job-1.tar.gz", "job-2.tar.gz")
    supabase.put_object("lora-models", "adapters/job-2.tar.gz", b"other")
    assert httpx.get(other).json() == {"statusCode": "400", "error": "InvalidJWT", "message": "invalid signature"}
    supabase.expire(url)
    answer = httpx.get(url)
    assert answer.status_code == 400 and answer.json() == {"statusCode": "400", "error": "InvalidJWT",
                                                           "message": EXP}
    assert httpx.get(supabase.sign("lora-models", "adapters/job-2.tar.gz")).content == b"other"


def test_download_and_auth(supabase):
    supabase.put_object("training-files", "user-1/data.jsonl", b'{"messages": []}\n')
    assert storage_client(supabase).from_("training-files").download("user-1/data.jsonl") == b'{"messages": []}\n'
    url = f"{supabase.url}/storage/v1/object/authenticated/training-files/user-1/data.jsonl"
    answer = httpx.get(url, headers={"Authorization": f"Bearer {supabase.service_key}"})
    assert answer.status_code == 200 and answer.content == b'{"messages": []}\n'
    assert answer.headers["Content-Length"] == str(len(answer.content))

    wrong = httpx.get(url, headers={"Authorization": "Bearer eyJ.wrong.key"})
    assert wrong.status_code == 400 and wrong.json() == {"statusCode": "403", "error": "Unauthorized",
                                                         "message": "invalid signature"}
    with pytest.raises(StorageApiError) as err:
        storage_client(supabase).from_("training-files").download("user-1/missing.jsonl")
    assert (err.value.status, err.value.code, err.value.message) == ("404", "not_found", "Object not found")
    with pytest.raises(StorageApiError) as err:
        storage_client(supabase).from_("no-such-bucket").download("x")
    assert (err.value.status, err.value.code) == ("404", "Bucket not found")


# -- TUS -----------------------------------------------------------------------------------------------------------
def tus_headers(server, **extra) -> dict:
    return {"Authorization": f"Bearer {server.service_key}", "Tus-Resumable": "1.0.0", **extra}


def tus_create(http, server, path: str, length: int, upsert=False) -> httpx.Response:
    meta = {"bucketName": "lora-models", "objectName": path, "contentType": "application/gzip",
            "cacheControl": "3600"}
    encoded = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in meta.items())
    extra = {"Upload-Length": str(length), "Upload-Metadata": encoded}
    if upsert:
        extra["x-upsert"] = "true"
    return http.post(f"{server.url}/storage/v1/upload/resumable", headers=tus_headers(server, **extra))


def tus_patch(http, server, location: str, offset: int, chunk: bytes) -> httpx.Response:
    return http.patch(location, content=chunk, headers=tus_headers(
        server, **{"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}))


def test_tus_upload_in_6_mib_chunks(supabase):
    data = os.urandom(TUS_CHUNK + 12345)
    with httpx.Client() as http:
        created = tus_create(http, supabase, "adapters/big.tar.gz", len(data))
        assert created.status_code == 201 and created.headers["Tus-Resumable"] == "1.0.0"
        location = created.headers["Location"]
        assert location.startswith(f"{supabase.url}/storage/v1/upload/resumable/")
        first = tus_patch(http, supabase, location, 0, data[:TUS_CHUNK])
        assert first.status_code == 204 and first.headers["Upload-Offset"] == str(TUS_CHUNK)
        head = http.head(location, headers=tus_headers(supabase))
        assert head.status_code == 200 and head.headers["Cache-Control"] == "no-store"
        assert (head.headers["Upload-Offset"], head.headers["Upload-Length"]) == (str(TUS_CHUNK), str(len(data)))
        assert ("lora-models", "adapters/big.tar.gz") not in supabase.objects
        last = tus_patch(http, supabase, location, TUS_CHUNK, data[TUS_CHUNK:])
        assert last.status_code == 204 and last.headers["Upload-Offset"] == str(len(data))
    assert supabase.objects[("lora-models", "adapters/big.tar.gz")] == data
    info = storage_client(supabase).from_("lora-models").info("adapters/big.tar.gz")
    parts = hashlib.md5(hashlib.md5(data[:TUS_CHUNK]).digest() + hashlib.md5(data[TUS_CHUNK:]).digest())
    assert info["etag"] == f'"{parts.hexdigest()}-2"' == multipart_etag(data) and info["size"] == len(data)
    assert info["content_type"] == "application/gzip"


def test_tus_cut_then_resume(supabase):
    data = os.urandom(2 * TUS_CHUNK + 1000)
    with httpx.Client() as http:
        location = tus_create(http, supabase, "adapters/cut.tar.gz", len(data)).headers["Location"]
        supabase.cut_next_patch = 4096
        with pytest.raises(httpx.TransportError):  # the server kept 4096 bytes and hung up without answering
            tus_patch(http, supabase, location, 0, data[:TUS_CHUNK])
        assert supabase.requests[-1][0] == "PATCH" and supabase.requests[-1][3] is None
        assert supabase.cut_next_patch is None
        head = http.head(location, headers=tus_headers(supabase))
        assert head.headers["Upload-Offset"] == "4096"
        assert tus_patch(http, supabase, location, 0, data[:TUS_CHUNK]).status_code == 409  # stale offset
        assert tus_patch(http, supabase, location, 4096, data[4096:4096 + TUS_CHUNK]).status_code == 204
        last = tus_patch(http, supabase, location, 4096 + TUS_CHUNK, data[4096 + TUS_CHUNK:])
        assert last.status_code == 204 and last.headers["Upload-Offset"] == str(len(data))
    assert supabase.objects[("lora-models", "adapters/cut.tar.gz")] == data
    assert supabase.meta[("lora-models", "adapters/cut.tar.gz")].etag == multipart_etag(data)


def test_tus_refusals(supabase):
    supabase.file_size_limit = 8 * 1024 * 1024
    with httpx.Client() as http:
        too_big = tus_create(http, supabase, "adapters/huge.tar.gz", supabase.file_size_limit + 1)
        assert too_big.status_code == 413 and too_big.json() == {
            "statusCode": "413", "error": "Payload too large",
            "message": "The object exceeded the maximum allowed size"}

        location = tus_create(http, supabase, "adapters/odd.tar.gz", TUS_CHUNK + 10).headers["Location"]
        odd = tus_patch(http, supabase, location, 0, b"x" * (5 * 1024 * 1024))  # not last, not 6 MiB
        assert odd.status_code == 400
        assert http.head(location, headers=tus_headers(supabase)).headers["Upload-Offset"] == "0"
        assert http.delete(location, headers=tus_headers(supabase)).status_code == 204
        assert http.head(location, headers=tus_headers(supabase)).status_code == 404

        supabase.put_object("lora-models", "adapters/there.tar.gz", b"old")
        assert tus_create(http, supabase, "adapters/there.tar.gz", 3).status_code == 409
        location = tus_create(http, supabase, "adapters/there.tar.gz", 3, upsert=True).headers["Location"]
        assert tus_patch(http, supabase, location, 0, b"new").status_code == 204
        assert supabase.objects[("lora-models", "adapters/there.tar.gz")] == b"new"

        wrong = http.post(f"{supabase.url}/storage/v1/upload/resumable",
                          headers={**tus_headers(supabase), "Authorization": "Bearer eyJ.wrong", "Upload-Length": "1"})
        assert wrong.status_code == 400 and wrong.json()["statusCode"] == "403"
    assert not supabase.errors
