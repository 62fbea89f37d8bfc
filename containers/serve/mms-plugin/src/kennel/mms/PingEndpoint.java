package kennel.mms;

import com.amazonaws.ml.mms.wlm.ModelManager;
import com.amazonaws.ml.mms.wlm.WorkerState;
import com.amazonaws.ml.mms.wlm.WorkerThread;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import software.amazon.ai.mms.servingsdk.Context;
import software.amazon.ai.mms.servingsdk.ModelServerEndpoint;
import software.amazon.ai.mms.servingsdk.annotations.Endpoint;
import software.amazon.ai.mms.servingsdk.annotations.helpers.EndpointTypes;
import software.amazon.ai.mms.servingsdk.http.Request;
import software.amazon.ai.mms.servingsdk.http.Response;

/**
 * GET /ping that tells the truth: 200 only while every model has at least one worker whose
 * model is loaded and warmed up, 503 otherwise.
 *
 * <p>MMS's own /ping answers 200 as soon as the port is bound, even while workers load and
 * after every worker failed. A worker reaches WORKER_MODEL_LOADED only after the handler's
 * initialize (model_fn + one warm-up inference) returned; kennel_serve.mms_toolkit.handler_service
 * makes a failed initialize end the worker, so a broken model never counts as loaded. While
 * the launcher drains on SIGTERM (kennel_serve.mms_toolkit.drain) it creates the file
 * "draining" in KENNEL_SERVE_STATE_DIR, and the load balancer is told to stop sending work.
 */
@Endpoint(
        urlPattern = "ping",
        endpointType = EndpointTypes.INFERENCE,
        description = "Health: 200 once the model is loaded and warmed up, 503 before and while draining")
public class PingEndpoint extends ModelServerEndpoint {

    @Override
    public void doGet(Request req, Response rsp, Context ctx) throws IOException {
        String reason = notReadyReason(ctx);
        String body;
        if (reason == null) {
            rsp.setStatus(200, "OK");
            body = "{\"status\": \"Healthy\"}\n";
        } else {
            rsp.setStatus(503, "Service Unavailable");
            body = "{\"status\": \"Unhealthy\", \"reason\": \"" + reason + "\"}\n";
        }
        rsp.setContentType("application/json");
        try (OutputStream out = rsp.getOutputStream()) {
            out.write(body.getBytes(StandardCharsets.UTF_8));
        }
    }

    // The SDK's default for other methods is an exception that MMS turns into a 500:
    // a client's wrong method is its mistake, so answer 405 with a JSON reason.
    @Override
    public void doPost(Request req, Response rsp, Context ctx) throws IOException {
        methodNotAllowed(rsp, "/ping");
    }

    @Override
    public void doPut(Request req, Response rsp, Context ctx) throws IOException {
        methodNotAllowed(rsp, "/ping");
    }

    @Override
    public void doDelete(Request req, Response rsp, Context ctx) throws IOException {
        methodNotAllowed(rsp, "/ping");
    }

    static void methodNotAllowed(Response rsp, String path) throws IOException {
        rsp.setStatus(405, "Method Not Allowed");
        rsp.setHeader("Allow", "GET");
        rsp.setContentType("application/json");
        try (OutputStream out = rsp.getOutputStream()) {
            out.write(("{\"error\": \"" + path + " accepts GET only\"}\n").getBytes(StandardCharsets.UTF_8));
        }
    }

    /** Null when ready, else a short reason (plain words, no quotes: it goes into JSON as is). */
    static String notReadyReason(Context ctx) {
        String stateDir = System.getenv("KENNEL_SERVE_STATE_DIR");
        if (stateDir != null && Files.exists(Paths.get(stateDir, "draining"))) {
            return "draining for shutdown";
        }
        if (ctx.getModels().isEmpty()) {
            return "no model registered";
        }
        for (String modelName : ctx.getModels().keySet()) {
            boolean loaded = false;
            for (WorkerThread worker : ModelManager.getInstance().getWorkers(modelName)) {
                loaded |= worker.getState() == WorkerState.WORKER_MODEL_LOADED;
            }
            if (!loaded) {
                return "model is loading";
            }
        }
        return null;
    }
}
